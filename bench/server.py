"""HTTP kNN server under load: `python -m bench.server` -> bench/results/index.json.

Runs `python -m indices.serve` as a subprocess pinned to core 0 (one torch thread) and
drives it from this process, pinned to core 1, with CLIENTS concurrent clients posting
clip-retrieval ClipClient's exact /knn-service body for SECONDS on loopback.

Query mix: a pool of distinct generated captions (`models.scenes`), drawn Zipf-like
(rank r with weight 1/r^s), so some queries repeat as in real query logs; the cache hit
rate is reported, and every server figure is also measured with the cache off.

Parts (`--only`):
  server         the collection's own CLIP (sieve-tiny) on a real collection (--collection)
  server_vitb32  open_clip:ViT-B-32 random weights on a synthetic 512-d collection, against
                 `sequential_qps`: a plain fp32, full-context, one-query-at-a-time
                 encode+search loop of the same model on the same pinned core.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import aiohttp
import numpy as np
import torch
import torch.nn.functional as F

from bench.common import write_results
from bench.synthetic import clustered_vectors, write_collection
from collection.storage import read_collection_json
from indices.build import build
from indices.search import Searcher
from models.clip import load_clip
from models.runtime import setup_logging
from models.scenes import make_caption, random_scene
from models.speed import bf16_supported

log = logging.getLogger("bench.server")

VITB32 = "open_clip:ViT-B-32"
SERVER_CORE, CLIENT_CORE = 0, 1
#: the server's answer cache in the cached runs (`indices.serve --cache-bytes`)
CACHE = "64MiB"


def caption_pool(n: int, seed: int = 0) -> list[str]:
    """Up to n distinct captions from the sample generator's caption grammar."""
    rng = np.random.default_rng(seed)
    seen: dict[str, None] = {}
    for _ in range(n * 20):
        seen.setdefault(make_caption(random_scene(rng), rng)[0], None)
        if len(seen) >= n:
            break
    return list(seen)


def zipf_draws(pool: list[str], n: int, s: float, seed: int = 1) -> list[str]:
    """n queries from pool, rank r drawn with probability proportional to 1/r^s (s=0: uniform)."""
    w = 1.0 / np.arange(1, len(pool) + 1) ** s
    idx = np.random.default_rng(seed).choice(len(pool), size=n, p=w / w.sum())
    return [pool[i] for i in idx]


def clip_client_body(text: str, indice_name: str, num_images: int) -> str:
    """clip-retrieval ClipClient's /knn-service JSON (its default options)."""
    return json.dumps(
        {
            "text": text,
            "image": None,
            "image_url": None,
            "embedding_input": None,
            "deduplicate": True,
            "use_safety_model": True,
            "use_violence_detector": True,
            "indice_name": indice_name,
            "use_mclip": False,
            "aesthetic_score": 9,
            "aesthetic_weight": 0.5,
            "modality": "image",
            "num_images": num_images,
            "num_result_ids": num_images,
        }
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pinned_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class Server:
    """`python -m indices.serve` on SERVER_CORE with one thread, as a context manager."""

    def __init__(self, collection: str, precision: str, cache_bytes: str) -> None:
        self.port = _free_port()
        self.cmd = [
            "taskset",
            "-c",
            str(SERVER_CORE),
            sys.executable,
            "-m",
            "indices.serve",
            "--collection",
            f"bench={collection}",
            "--port",
            str(self.port),
            "--threads",
            "1",
            "--precision",
            precision,
            "--cache-bytes",
            cache_bytes,
        ]

    def __enter__(self) -> "Server":
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            self.cmd, env=_pinned_env(), stdout=self.log, stderr=subprocess.STDOUT
        )
        return self

    def __exit__(self, *exc: Any) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-3000:]


async def _cache_hits(session: Any, url: str) -> float:
    async with session.get(url + "/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith("sieve_knn_cache_hits_total"):
                return float(line.split()[-1])
    return 0.0


async def _load(
    port: int, queries: list[str], clients: int, seconds: float, warmup: float, num_images: int
) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        for _ in range(600):  # wait for the server to listen
            try:
                async with session.get(url + "/health") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
        else:
            raise RuntimeError("server did not come up")
        # warm-up with texts outside the pool: loads the model and index, fills no cache entry
        # that the measured run could hit
        await asyncio.gather(
            *[
                session.post(
                    url + "/knn-service", data=clip_client_body(f"warm up {i}", "bench", num_images)
                )
                for i in range(2 * clients)
            ]
        )
        t_end = time.perf_counter() + warmup
        while time.perf_counter() < t_end:
            await asyncio.gather(
                *[
                    session.post(
                        url + "/knn-service",
                        data=clip_client_body(f"warm {i} {time.time()}", "bench", num_images),
                    )
                    for i in range(clients)
                ]
            )
        hits0 = await _cache_hits(session, url)
        lat: list[float] = []
        errors = 0
        cursor = iter(range(10**9))
        stop = time.perf_counter() + seconds

        async def client() -> None:
            nonlocal errors
            while time.perf_counter() < stop:
                q = queries[next(cursor) % len(queries)]
                t0 = time.perf_counter()
                try:
                    async with session.post(
                        url + "/knn-service", data=clip_client_body(q, "bench", num_images)
                    ) as r:
                        body = await r.read()
                        ok = r.status == 200 and len(json.loads(body)) > 0
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                    ok = False
                lat.append(time.perf_counter() - t0)
                errors += not ok

        t0 = time.perf_counter()
        await asyncio.gather(*[client() for _ in range(clients)])
        wall = time.perf_counter() - t0
        hits = await _cache_hits(session, url) - hits0
    ms = np.array(lat) * 1000
    return {
        "qps": len(lat) / wall,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "errors": int(errors),
        "requests": len(lat),
        "cache_hit_rate": hits / max(len(lat), 1),
    }


def load_run(
    collection: str,
    queries: list[str],
    precision: str,
    cache_bytes: str,
    clients: int,
    seconds: float,
    warmup: float,
    num_images: int,
) -> dict[str, Any]:
    """One server process, one load run; returns qps / p50 / p99 / errors / cache hit rate."""
    with Server(collection, precision, cache_bytes) as srv:
        try:
            out = asyncio.run(_load(srv.port, queries, clients, seconds, warmup, num_images))
        except RuntimeError:
            raise RuntimeError(f"server failed: {srv.output()}") from None
    out.update(
        {"precision": precision, "cache_bytes": cache_bytes, "clients": clients, "seconds": seconds}
    )
    log.info("load %s: %s", collection, out)
    return out


def sequential(
    collection: str, spec: str, queries: list[str], seconds: float, num_images: int
) -> dict[str, Any]:
    """Plain loop (runs pinned, in its own process): fp32 full-context encode of one text, then
    the same search the server does (dedup + safety, k=num_images), no batching, no cache."""
    torch.set_num_threads(1)
    enc = load_clip(spec, device="cpu")
    searcher = Searcher(collection, encoder=enc)

    def one(q: str) -> None:
        # the bare open_clip model, not Sieve's Clip: its own tokenizer, the full 77-token context
        with torch.inference_mode():
            vec = F.normalize(enc.model.encode_text(enc.tokenizer([q])).float(), dim=-1).numpy()
        searcher.search_vectors(vec, num_images, "image", None, True, True)

    for q in queries[:5]:
        one(q)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        one(queries[n % len(queries)])
        n += 1
    return {"sequential_qps": n / (time.perf_counter() - t0), "sequential_queries": n}


def _sequential_pinned(
    collection: str, spec: str, queries: list[str], seconds: float, num_images: int
) -> dict[str, Any]:
    code = (
        "import json,sys; from bench.server import sequential; a=json.loads(sys.stdin.read()); "
        "print(json.dumps(sequential(**a)))"
    )
    arg = json.dumps(
        {
            "collection": collection,
            "spec": spec,
            "queries": queries,
            "seconds": seconds,
            "num_images": num_images,
        }
    )
    out = subprocess.run(
        ["taskset", "-c", str(SERVER_CORE), sys.executable, "-c", code],
        input=arg,
        text=True,
        capture_output=True,
        env=_pinned_env(),
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def precision_check(spec: str, texts: list[str]) -> dict[str, Any]:
    """Trimmed-context fp32 vs the full 77-token fp32 encoder (max abs diff), and bf16
    trimmed vs fp32 full (min / mean cosine), on the benchmark's own queries."""
    torch.manual_seed(0)
    enc = load_clip(spec, device="cpu", trim_text=False)
    full = enc.encode_texts(texts)
    tokens = enc.tokenizer(texts)
    trim = enc.variant(trim_text=True).encode_text_tokens(tokens)
    bf16 = enc.variant(precision="bf16", trim_text=True).encode_text_tokens(tokens)
    cos = (full * bf16).sum(1)
    lengths = (tokens != 0).sum(1)
    return {
        "trim_vs_full_max_abs_diff": float(np.abs(full - trim).max()),
        "bf16_vs_fp32_cosine_min": float(cos.min()),
        "bf16_vs_fp32_cosine_mean": float(cos.mean()),
        "bf16_native": bf16_supported("cpu"),
        "context_length": int(tokens.shape[1]),
        "prompt_tokens_mean": float(lengths.float().mean()),
        "prompt_tokens_max": int(lengths.max()),
    }


def vitb32_collection(root: str, n: int) -> str:
    """A synthetic n x 512 collection naming ViT-B-32 as its CLIP model, with its index."""
    if not os.path.exists(os.path.join(root, "indices", "image.index")):
        write_collection(
            root,
            [clustered_vectors(n, 512, 200, seed=0)],
            [clustered_vectors(n, 512, 200, seed=1)],
            clip_model=VITB32,
        )
        build(root, modality="image")
    return root


def run(
    collection: str | None = None,
    only: str = "server,server_vitb32",
    seconds: float = 30.0,
    clients: int = 16,
    pool: int = 2000,
    zipf_s: float = 1.0,
    num_images: int = 10,
    warmup: float = 5.0,
    vitb32_n: int = 20000,
    work: str | None = None,
) -> dict[str, Any]:
    """Run the parts and merge them into bench/results/index.json."""
    parts = set(only.split(","))
    captions = caption_pool(pool)
    queries = zipf_draws(captions, 200_000, zipf_s)
    mix = {
        "distinct_captions": len(captions),
        "zipf_s": zipf_s,
        "distinct_in_first_1000": len(set(queries[:1000])),
        "source": "models.scenes caption grammar",
        "request": "ClipClient /knn-service body, "
        f"num_images={num_images}, deduplicate and use_safety_model on, modality image",
        "server_core": SERVER_CORE,
        "client_core": CLIENT_CORE,
        "server_threads": 1,
        "clients": clients,
        "seconds": seconds,
    }
    os.sched_setaffinity(0, {CLIENT_CORE})
    payload: dict[str, Any] = {}
    if "server" in parts:
        if not collection:
            raise SystemExit(
                "--collection: a sieve-tiny collection with "
                "an image index is needed for part 'server'"
            )
        spec = read_collection_json(collection).get("clip_model", "sieve-tiny")
        cached = load_run(collection, queries, "fp32", CACHE, clients, seconds, warmup, num_images)
        nocache = load_run(collection, queries, "fp32", "0", clients, seconds, warmup, num_images)
        payload["server"] = {
            **{k: cached[k] for k in ("qps", "p50_ms", "p99_ms", "errors")},
            "cache_hit_rate": cached["cache_hit_rate"],
            "requests": cached["requests"],
            "no_cache": nocache,
            "clip_model": spec,
            "collection": collection,
            "query_mix": mix,
        }
    if "server_vitb32" in parts:
        work = work or os.path.join(tempfile.gettempdir(), "sieve-bench-server")
        coll = vitb32_collection(os.path.join(work, "vitb32"), vitb32_n)
        check = precision_check(VITB32, captions[:256])
        precision = (
            "bf16" if check["bf16_native"] and check["bf16_vs_fp32_cosine_min"] >= 0.995 else "fp32"
        )
        seq = _sequential_pinned(coll, VITB32, queries, seconds, num_images)
        cached = load_run(coll, queries, precision, CACHE, clients, seconds, warmup, num_images)
        nocache = load_run(coll, queries, precision, "0", clients, seconds, warmup, num_images)
        payload["server_vitb32"] = {
            "qps": cached["qps"],
            "p99_ms": cached["p99_ms"],
            **seq,
            "speedup": cached["qps"] / seq["sequential_qps"],
            "p50_ms": cached["p50_ms"],
            "errors": cached["errors"],
            "cache_hit_rate": cached["cache_hit_rate"],
            "no_cache": {**nocache, "speedup": nocache["qps"] / seq["sequential_qps"]},
            "precision": precision,
            "precision_check": check,
            "collection": f"synthetic {vitb32_n} x 512, clustered",
            "query_mix": mix,
            "how": "server: micro-batched concurrent queries, "
            "text tower trimmed to the batch's longest prompt, "
            f"{precision} weights, LRU cache; baseline: fp32, "
            "full 77-token context, one query at a time",
        }
    write_results("index", payload, merge=True)
    return payload


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.server", description=__doc__.splitlines()[0])
    p.add_argument("--collection", help="a sieve-tiny collection with indices (part 'server')")
    p.add_argument("--only", default="server,server_vitb32")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--pool", type=int, default=2000, help="distinct captions in the query pool")
    p.add_argument(
        "--zipf-s", type=float, default=1.0, help="Zipf exponent of query popularity (0: uniform)"
    )
    p.add_argument("--num-images", type=int, default=10)
    p.add_argument("--vitb32-n", type=int, default=20000)
    p.add_argument(
        "--work", default=None, help="scratch folder for the synthetic ViT-B-32 collection"
    )
    a = p.parse_args(argv)
    setup_logging()
    print(
        json.dumps(
            run(
                a.collection,
                a.only,
                a.seconds,
                a.clients,
                a.pool,
                a.zipf_s,
                a.num_images,
                vitb32_n=a.vitb32_n,
                work=a.work,
            ),
            indent=2,
            default=float,
        )
    )


if __name__ == "__main__":
    main()
