"""The aiohttp application behind `python -m indices.serve`,
wire-compatible with clip-retrieval's `clip back`.

POST /knn-service, POST /metadata, GET /indices-list (clip back's contract) plus GET /health
and Prometheus GET /metrics. Concurrent queries are micro-batched (one text encode and one
faiss call per batch; texts run through the text tower only up to the batch's longest
prompt, optionally in bf16 or int8, see `models.speed`) and repeated queries are answered
from an LRU cache of answer bytes, bounded in bytes. Work per request is bounded: results,
ids per /metadata call, and near-duplicate collapse (`indices.search.DEDUP_MAX_CANDIDATES`).
Bad requests get a 4xx JSON {"error": ...} naming the problem; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from collection import schema as S
from collection.takedown import TakedownError
from indices.search import DEDUP_MAX_CANDIDATES, QueryError, Searcher
from models.clip import Clip
from models.prompts import PromptError, combine, parse_prompts
from pipelines.decode import DEFAULT_MAX_PIXELS, decode_image

log = logging.getLogger(__name__)

MAX_BODY = 8 * 2**20
MAX_BATCH = 64
#: most results (num_images / num_result_ids) one query may ask for, as clip back allows
MAX_RESULTS = 10_000
#: most ids one /metadata request may ask for (each answer row is read and serialised)
MAX_METADATA_IDS = MAX_RESULTS
#: default bound of the answer cache: the JSON bytes of the answers plus their keys
CACHE_BYTES = 64 * 2**20
#: what one cache entry costs beyond its answer's bytes (its digest, the dict slot, objects)
CACHE_ENTRY_OVERHEAD = 256
#: the /knn-service response header saying whether the answer is exact ("true") or approximate
EXACT_HEADER = "X-Sieve-Exact"
#: deepest nesting of a request body; clip back's bodies are flat objects with one list
MAX_JSON_DEPTH = 16


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Batcher:
    """Collects concurrent queries and runs them together on one worker thread."""

    def __init__(
        self,
        searcher: Any,
        executor: ThreadPoolExecutor,
        max_batch: int = MAX_BATCH,
        precision: str = "fp32",
    ) -> None:
        self.searcher, self.executor, self.max_batch = searcher, executor, max_batch
        self.precision = precision
        self._text: Any = None
        self.queue: asyncio.Queue | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.batch_sizes: list[int] = []

    async def submit(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        if self.loop is not asyncio.get_running_loop():  # first call, or a new event loop
            self.loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()
            self.task = self.loop.create_task(self._run())
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((job, fut))
        return await fut

    async def _run(self) -> None:
        assert self.queue is not None
        while True:
            batch = [await self.queue.get()]
            while len(batch) < self.max_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            self.batch_sizes.append(len(batch))
            results = await asyncio.get_running_loop().run_in_executor(
                self.executor, self._work, [b[0] for b in batch]
            )
            for (_, fut), res in zip(batch, results):
                if not fut.done():
                    (fut.set_exception(res) if isinstance(res, Exception) else fut.set_result(res))

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Text embeddings for one batch: trimmed context, `precision` weights (a copy of the
        collection's model, so image queries keep the original fp32 one). Encoders that are
        not open_clip models (test stand-ins) are called as they are."""
        enc = self.searcher.encoder
        if not isinstance(enc, Clip):  # a stand-in encoder (tests): used as it is
            return enc.encode_texts(texts)
        if self._text is None:
            # int8 kernels are CPU ones: an int8 text tower runs on the CPU whatever the images use
            device = "cpu" if self.precision == "int8" else enc.device
            self._text = enc.variant(
                precision=self.precision,
                device=device,
                trim_text=True,
                batch_size=max(self.max_batch, 1),
            )
        return self._text.encode_texts(texts)

    def _work(self, jobs: list[dict[str, Any]]) -> list[Any]:
        """Encode all texts in one call, then search per (modality, options) group."""
        vecs: list[Any] = [None] * len(jobs)
        texts = [i for i, j in enumerate(jobs) if j.get("prompts") is not None]
        try:
            if (
                texts
            ):  # every prompt of every weighted query in one encode, then each query's combination
                enc = self.encode_texts([p.text for i in texts for p in jobs[i]["prompts"]])
                start = 0
                for i in texts:
                    n = len(jobs[i]["prompts"])
                    vecs[i] = combine(enc[start : start + n], jobs[i]["prompts"])
                    start += n
            for i, j in enumerate(jobs):
                if vecs[i] is None:
                    vecs[i] = self.searcher.embed(
                        image=j.get("image"), embedding=j.get("embedding")
                    )
        except (QueryError, ValueError, OSError) as exc:
            return [BadRequest(str(exc))] * len(jobs)
        out: list[Any] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, j in enumerate(jobs):
            groups.setdefault((j["modality"], j["k"], j["deduplicate"], j["safe"]), []).append(i)
        for (modality, k, dedup, safe), idx in groups.items():
            q = np.stack([vecs[i] / max(np.linalg.norm(vecs[i]), 1e-12) for i in idx]).astype(
                np.float32
            )
            try:
                res = self.searcher.search_vectors(q, k, modality, None, dedup, safe)
            except (QueryError, ValueError) as exc:
                res = [BadRequest(str(exc))] * len(idx)
            for i, r in zip(idx, res):
                out[i] = r
        return out


class App:
    """The aiohttp application over named Searchers."""

    def __init__(
        self,
        collections: dict[str, str],
        searchers: dict[str, Any] | None = None,
        allow_image_url: bool = False,
        cache_bytes: int = CACHE_BYTES,
        max_body: int = MAX_BODY,
        precision: str = "fp32",
        max_batch: int = MAX_BATCH,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.searchers = searchers or {name: Searcher(path) for name, path in collections.items()}
        self.executor = ThreadPoolExecutor(1)
        self.batchers = {
            n: Batcher(s, self.executor, max_batch, precision) for n, s in self.searchers.items()
        }
        self.allow_image_url, self.max_body, self.max_pixels = allow_image_url, max_body, max_pixels
        #: sha256 of the canonical request body -> the answer's JSON bytes, least recent first
        self.cache: OrderedDict[bytes, bytes] = OrderedDict()
        #: the cached answers' keys that are approximate (the index's nearest lists)
        self.cache_approximate: set[bytes] = set()
        self.cache_bytes = max(0, int(cache_bytes))
        self.cached_bytes = 0
        #: each searcher's takedown version the cached answers were made under
        self._takedown_seen = {
            n: getattr(s, "takedown_version", 0) for n, s in self.searchers.items()
        }
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "sieve_knn_requests",
            "requests by endpoint and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram("sieve_knn_seconds", "knn-service latency", registry=self.registry)
        self.cache_hits = Counter(
            "sieve_knn_cache_hits", "knn queries answered from the cache", registry=self.registry
        )
        self.cache_gauge = Gauge(
            "sieve_knn_cache_bytes", "bytes the answer cache holds", registry=self.registry
        )

    def make(self) -> Any:
        app = web.Application(client_max_size=self.max_body, middlewares=[self._errors])
        app.router.add_post("/knn-service", self.knn)
        app.router.add_post("/metadata", self.metadata)
        app.router.add_get("/indices-list", self.indices_list)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        return app

    @staticmethod
    def _dumps(data: Any) -> str:
        return json.dumps(data, allow_nan=False, default=float)

    def _json(self, data: Any, status: int = 200) -> Any:
        return web.json_response(data, status=status, dumps=self._dumps)

    @staticmethod
    def _json_bytes(body: bytes, exact: bool) -> Any:
        """A knn answer; its `X-Sieve-Exact` header says whether the rows are the exact best
        ones or the index's approximate ones (clip back's body is a bare list)."""
        return web.Response(
            body=body,
            content_type="application/json",
            headers={EXACT_HEADER: "true" if exact else "false"},
        )

    def _cache_put(self, key: bytes, answer: bytes, exact: bool) -> None:
        """Keep an answer, dropping the least recently used ones while the cache is over its
        byte bound; an answer bigger than a quarter of the bound is not kept."""
        cost = len(answer) + len(key) + CACHE_ENTRY_OVERHEAD
        if cost > self.cache_bytes // 4 or key in self.cache:
            return
        self.cache[key] = answer
        if not exact:
            self.cache_approximate.add(key)
        self.cached_bytes += cost
        while self.cached_bytes > self.cache_bytes and self.cache:
            old_key, old = self.cache.popitem(last=False)
            self.cache_approximate.discard(old_key)
            self.cached_bytes -= len(old) + len(old_key) + CACHE_ENTRY_OVERHEAD
        self.cache_gauge.set(self.cached_bytes)

    def _cache_clear(self) -> None:
        self.cache.clear()
        self.cache_approximate.clear()
        self.cached_bytes = 0
        self.cache_gauge.set(0)

    def _middleware_error(self, request: Any, status: int, message: str) -> Any:
        self.requests.labels(request.path, str(status)).inc()
        return self._json({"error": message}, status)

    @property
    def _errors(self) -> Any:
        @web.middleware
        async def mw(request: Any, handler: Any) -> Any:
            try:
                resp = await handler(request)
            except BadRequest as exc:
                return self._middleware_error(request, exc.status, str(exc))
            except web.HTTPRequestEntityTooLarge:
                return self._middleware_error(
                    request, 413, f"body larger than {self.max_body} bytes"
                )
            except web.HTTPException as exc:
                return self._middleware_error(request, exc.status, exc.reason)
            self.requests.labels(request.path, str(resp.status)).inc()
            return resp

        return mw

    async def _body(self, request: Any) -> dict[str, Any]:
        raw = await request.read()  # ClipClient sends JSON without a content type
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(f"body is not JSON: {exc}") from exc
        except RecursionError as exc:
            raise BadRequest(
                f"body nests deeper than this server parses (limit {MAX_JSON_DEPTH})"
            ) from exc
        if not isinstance(body, dict):
            raise BadRequest("body must be a JSON object")
        if _depth(body) > MAX_JSON_DEPTH:
            raise BadRequest(f"body nests deeper than {MAX_JSON_DEPTH} levels")
        return body

    def _searcher_name(self, body: dict[str, Any]) -> str:
        name = body.get("indice_name")
        if name is None:
            raise BadRequest("missing field: indice_name")
        if name not in self.searchers:
            raise BadRequest(f"unknown index {name!r}; known: {sorted(self.searchers)}", 404)
        return name

    async def knn(self, request: Any) -> Any:
        t0 = time.perf_counter()
        body = await self._body(request)
        name = self._searcher_name(body)
        self._refresh_takedown(name)
        key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest()
        if key in self.cache:
            self.cache.move_to_end(key)
            self.cache_hits.inc()
            return self._json_bytes(self.cache[key], key not in self.cache_approximate)
        version = getattr(self.searchers[name], "takedown_version", 0)
        job = await self._job(body)
        res = await self.batchers[name].submit(job)
        num_images = job["num_images"]
        exact = bool(getattr(res, "exact", True))
        res = res[:num_images]
        if version != getattr(
            self.searchers[name], "takedown_version", 0
        ):  # the list changed while this query ran
            blocked = self.searchers[name].is_blocked([r["id"] for r in res])
            res = [r for r, b in zip(res, blocked) if not b]
            answer = self._dumps(res).encode()
        else:
            answer = self._dumps(res).encode()
            if self.cache_bytes:
                self._cache_put(key, answer, exact)
        self.latency.observe(time.perf_counter() - t0)
        return self._json_bytes(answer, exact)

    def _refresh_takedown(self, name: str) -> None:
        """Pick up a changed takedown list (the searcher stats the file on every call) and drop
        every cached answer made before it, so no cached result shows a newly listed row."""
        searcher = self.searchers[name]
        refresh = getattr(searcher, "refresh_takedown", None)
        if refresh is None:  # a stand-in searcher (tests) without a takedown list
            return
        try:
            refresh()
        except TakedownError as exc:  # fail closed: answer nothing rather than ignore the list
            raise BadRequest(
                f"takedown list unreadable, not serving {name!r}: {exc}", 503
            ) from None
        if searcher.takedown_version != self._takedown_seen.get(name):
            self._takedown_seen[name] = searcher.takedown_version
            self._cache_clear()
            log.info("%s: takedown list changed; result cache cleared", name)

    async def _job(self, body: dict[str, Any]) -> dict[str, Any]:
        inputs = [
            f
            for f in ("text", "image", "image_url", "embedding_input")
            if body.get(f) not in (None, "")
        ]
        if not inputs:
            raise BadRequest("missing field: one of text, image, image_url, embedding_input")
        if len(inputs) > 1:
            raise BadRequest(f"give one query input, got {inputs}")
        modality = body.get("modality", "image")
        if modality not in ("image", "text"):
            raise BadRequest(f"modality: unknown {modality!r}; expected image or text")
        try:
            num_images = int(body.get("num_images", 40))
            k = int(body.get("num_result_ids") or num_images)
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"num_images / num_result_ids must be integers: {exc}") from exc
        if not 1 <= num_images <= MAX_RESULTS or not 1 <= k <= MAX_RESULTS:
            raise BadRequest(f"num_images and num_result_ids must be within 1..{MAX_RESULTS}")
        job: dict[str, Any] = {
            "modality": modality,
            "num_images": num_images,
            "k": max(k, num_images),
            "deduplicate": bool(body.get("deduplicate", False)),
            "safe": bool(body.get("use_safety_model", False)),
        }
        if job["deduplicate"] and job["k"] > DEDUP_MAX_CANDIDATES:
            raise BadRequest(
                f"num_images and num_result_ids must be within 1..{DEDUP_MAX_CANDIDATES} with "
                "deduplicate (near-duplicates are collapsed among that many candidates)"
            )
        # use_violence_detector, use_mclip, aesthetic_score/weight are accepted; Sieve has no
        # violence prompts, multilingual CLIP or aesthetic embeddings, so they change nothing.
        if "text" in inputs:
            if not isinstance(body["text"], str):
                raise BadRequest("text must be a string")
            try:  # "a red star:1|blurry:-0.5": weighted prompts, as everywhere in Sieve
                job["prompts"] = parse_prompts(body["text"])
            except PromptError as exc:
                raise BadRequest(f"text: {exc}") from exc
        elif "embedding_input" in inputs:
            emb = body["embedding_input"]
            try:
                job["embedding"] = np.asarray(emb, dtype=np.float32).reshape(-1)
            except (TypeError, ValueError) as exc:
                raise BadRequest(f"embedding_input must be a list of numbers: {exc}") from exc
        else:
            raw = await self._image_bytes(body, inputs[0])
            # the embed job's decoder and pixel limit: a header claiming a
            # huge image is refused unread
            image, status, error = decode_image(raw, self.max_pixels)
            if image is None:
                if status == S.STATUS_TOO_LARGE:
                    raise BadRequest(f"{inputs[0]}: image too large: {error}", 413)
                raise BadRequest(f"{inputs[0]}: not a decodable image: {error}")
            job["image"] = image
        return job

    async def _image_bytes(self, body: dict[str, Any], field: str) -> bytes:
        if field == "image":
            try:
                return base64.b64decode(body["image"], validate=True)
            except (binascii.Error, TypeError, ValueError) as exc:
                raise BadRequest(f"image: bad base64: {exc}") from exc
        if not self.allow_image_url:
            raise BadRequest(
                "image_url: fetching URLs is disabled on this "
                "server (start it with --allow-image-url)",
                403,
            )
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            try:
                async with s.get(body["image_url"]) as r:
                    if r.status != 200:
                        raise BadRequest(f"image_url: HTTP {r.status}")
                    return await r.content.read(self.max_body)
            except aiohttp.ClientError as exc:
                raise BadRequest(f"image_url: {exc}") from exc

    async def metadata(self, request: Any) -> Any:
        body = await self._body(request)
        name = self._searcher_name(body)
        self._refresh_takedown(name)
        ids = body.get("ids")
        if not isinstance(ids, list):
            raise BadRequest("missing field: ids (a list of integers)")
        if len(ids) > MAX_METADATA_IDS:
            raise BadRequest(f"ids: {len(ids)} asked, at most {MAX_METADATA_IDS} per request")
        try:
            return self._json(self.searchers[name].metadata_for([int(i) for i in ids]))
        except (QueryError, TypeError, ValueError) as exc:
            raise BadRequest(str(exc)) from exc

    async def indices_list(self, request: Any) -> Any:
        return self._json(list(self.searchers))

    async def health(self, request: Any) -> Any:
        return self._json(
            {"status": "ok", "indices": {n: s.modalities() for n, s in self.searchers.items()}}
        )

    async def metrics(self, request: Any) -> Any:
        return web.Response(body=generate_latest(self.registry), content_type="text/plain")


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON value (iterative: no recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, level)
            stack.extend(
                (v, level + 1) for v in (item.values() if isinstance(item, dict) else item)
            )
    return deepest
