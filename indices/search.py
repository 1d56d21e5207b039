"""Search a collection: `Searcher(collection).query(text=..., image=..., embedding=...)`.

Results are rows of metadata plus `id` (global vector id) and `similarity`. The takedown
list is always applied; every query checks the file for a change first (`refresh_takedown`, one
stat), so a listing applies from the next query. Near-duplicate collapse (over the best
`DEDUP_MAX_CANDIDATES` candidates, in blocks: bounded memory and work), safe mode, hiding
watermarked images and SQL-style metadata filters (a DuckDB WHERE clause over the candidate
rows, run in `collection.sandbox`'s locked worker process with time and memory limits) are
options.

Metadata rows are never all in memory: they are looked up by id from memory-mapped Arrow
files (`indices.rows.RowStore`, as clip back memory-maps its metadata), so a searcher over
millions of rows stays small. A collection on an object store (any fsspec URL) is searched the
same way: its index and row files are copied to a local cache (`indices.local`) and mapped
from there, and the exact re-rank reads only the candidates' embedding rows, by range.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from collection import schema as S
from collection.embeddings import EmbeddingStore
from collection.parts import CollectionError
from collection.sandbox import Limits, SqlError
from collection.sandbox_pool import SandboxPool
from collection.storage import is_local, read_collection_json
from collection.takedown import TakedownWatch
from indices.build import open_index
from indices.exact import Planner, top, want_for
from indices.local import has_index
from indices.rescore import exact_similarities
from indices.rows import RowStore
from indices.tune import set_search_params
from models.prompts import PromptError, combine, parse_prompts

log = logging.getLogger(__name__)

DEDUP_THRESHOLD = 0.94
#: near-duplicate collapse looks at this many best-ranked candidates at most: its similarities
#: are computed in blocks of DEDUP_BLOCK rows, so one query costs DEDUP_BLOCK x this many floats
DEDUP_MAX_CANDIDATES = 4096
#: ... unless k needs more rows than survive in it: the window then doubles up to this many
DEDUP_WINDOW_MAX = 1 << 14
DEDUP_BLOCK = 512
PUNSAFE_MAX = 0.5
PWATERMARK_MAX = 0.8
#: Columns returned by default (clip back returns url/caption; we add our scores).
DEFAULT_COLUMNS = (
    S.KEY,
    S.URL,
    S.CAPTION,
    S.WIDTH,
    S.HEIGHT,
    S.CLIP_SIMILARITY,
    S.PUNSAFE,
    S.PWATERMARK,
)
#: what one `filters=` WHERE clause may use: the candidates of one query are a
#: few thousand rows at most
FILTER_LIMITS = Limits(timeout_s=5.0, memory_limit="256MB", threads=1)
#: the table a filter's WHERE clause reads; `__pos` is the candidate's position
FILTER_TABLE = "candidates"
#: most candidates one filter call sends to the sandbox (an exact scan's slices are cut to it)
FILTER_BATCH = 1 << 15
#: candidates of one query re-scored exactly from the collection's embeddings (the index's best
#: first); the rest keep the index's own score. 0 turns the re-rank off, which is the default
#: for a collection whose embeddings are remote (each re-scored row is a range read)
RERANK_MAX = 1 << 14
#: the environment variable that sets it for every searcher of local collections (the server's)
RERANK_ENV = "SIEVE_RERANK_MAX"


class Results(list):
    """Result rows, and whether they are the exact best rows (`exact`) or an approximate answer
    from the index's nearest lists."""

    def __init__(self, rows: Sequence[dict[str, Any]] = (), exact: bool = True) -> None:
        super().__init__(rows)
        self.exact = exact


class QueryError(ValueError):
    """A query the searcher cannot answer (bad filter, wrong dimension, no input)."""


def duplicate_ids(
    vectors: np.ndarray, threshold: float = DEDUP_THRESHOLD, block: int = DEDUP_BLOCK
) -> set[int]:
    """Positions to drop: all but the first member of each connected component of the
    graph linking rows with cosine >= threshold (the first is the best-ranked). The
    similarities are computed `block` rows at a time, so memory is block x N, not N x N."""
    n = len(vectors)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for start in range(0, n, block):
        sims = vectors[start : start + block] @ vectors.T
        rows, cols = np.nonzero(sims >= threshold)
        for i, j in zip(rows + start, cols):
            if j <= i:  # each pair once (and never a row with itself)
                continue
            a, b = find(int(i)), find(int(j))
            if a != b:
                parent[max(a, b)] = min(a, b)
    return {i for i in range(n) if find(i) != i}


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, np.generic):
        return _json_value(v.item())
    if hasattr(
        v, "isoformat"
    ):  # dates and times (a source's own columns) as ISO text, as JSON holds them
        return v.isoformat()
    return v


class Searcher:
    """Loads a collection's indices and metadata rows
    (both memory-mapped) and takedown list once."""

    def __init__(
        self,
        collection: str,
        encoder: Any = None,
        mmap: bool = True,
        columns: Sequence[str] | None = DEFAULT_COLUMNS,
        filter_limits: Limits = FILTER_LIMITS,
        rerank_max: int | None = None,
    ) -> None:
        """`rerank_max`: candidates re-scored exactly per query (None: $SIEVE_RERANK_MAX, else
        RERANK_MAX, for a local collection; 0 for a remote one)."""
        self.root = collection
        if rerank_max is None:
            rerank_max = int(os.environ.get(RERANK_ENV, RERANK_MAX)) if is_local(collection) else 0
        self.rerank_max = rerank_max
        self.layout = S.CollectionLayout(collection)
        self.info = read_collection_json(collection)
        self._encoder = encoder
        self._mmap = mmap
        self._lock = threading.Lock()
        self._indices: dict[str, tuple[Any, dict[str, Any], EmbeddingStore]] = {}
        self._planners: dict[str, Planner] = {}
        #: every embedded row's metadata, memory-mapped, by global id
        self.rows = RowStore.open(collection)
        names = self.rows.column_names
        self.columns = [c for c in (columns or names) if c in names]
        self.count = self.rows.count
        self._watch = TakedownWatch(collection)
        #: bumped whenever the takedown list changes (the server drops its result cache then)
        self.takedown_version = 0
        self._filter_limits = filter_limits
        self._sandbox: SandboxPool | None = None
        if len(self._watch.takedown):
            log.info(
                "%s: takedown list has %d entries", self.layout.takedown, len(self._watch.takedown)
            )

    # ---- loading -------------------------------------------------------------------------
    def refresh_takedown(self) -> bool:
        """Re-read takedown.parquet if it changed (one stat per call); whether it did."""
        takedown, changed = self._watch.poll()
        if changed:
            self.takedown_version += 1
            log.info("%s: takedown list now has %d entries", self.layout.takedown, len(takedown))
        return changed

    def is_blocked(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Per id: whether the takedown list, as last refreshed, names its key, url or sha256
        (the rows asked about are the only ones read, so the list's size and the collection's
        never cost memory). Every public entry point refreshes the list first."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        takedown = self._watch.takedown
        if not len(takedown) or not len(ids):
            return np.zeros(len(ids), dtype=bool)
        listed = {S.KEY: takedown.keys, S.URL: takedown.urls, S.SHA256: takedown.sha256}
        cols = [c for c, values in listed.items() if values and c in self.rows.column_names]
        return takedown.blocked_mask(self.rows.take(ids, cols))

    def visible(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Per id: whether a page may show it, the list checked for a change first (what a page
        that lists ids read elsewhere, such as the map's points, filters them with)."""
        self.refresh_takedown()
        return ~self.is_blocked(ids)

    def modalities(self) -> list[str]:
        """The modalities with a complete index (its json written)."""
        return [m for m in S.MODALITIES if has_index(self.root, m)]

    def index(self, modality: str) -> tuple[Any, dict[str, Any], EmbeddingStore]:
        """(faiss index, its json, embedding store) for a modality, loaded once."""
        with self._lock:
            if modality not in self._indices:
                if modality not in S.MODALITIES:
                    raise QueryError(
                        f"modality: unknown {modality!r}; expected one of {list(S.MODALITIES)}"
                    )
                idx, doc = open_index(self.root, modality, self._mmap)
                set_search_params(idx, doc.get("params", {}))
                store = EmbeddingStore.open(self.root, modality)
                if store.count != self.count:
                    raise CollectionError(
                        f"{self.root}: {store.count} {modality} "
                        f"vectors but {self.count} metadata rows"
                    )
                self._indices[modality] = (idx, doc, store)
            return self._indices[modality]

    @property
    def encoder(self) -> Any:
        """The collection's CLIP model (collection.json's spec),
        loaded on first text/image query."""
        if self._encoder is None:
            # torch and open_clip only when no encoder was given (the web UI gives a client of
            # its encoder process, so its own process never loads them)
            from models.clip import load_clip

            self._encoder = load_clip(self.info.get("clip_model", "sieve-tiny"))
        return self._encoder

    # ---- querying ------------------------------------------------------------------------
    def embed(
        self, text: str | None = None, image: Any = None, embedding: Sequence[float] | None = None
    ) -> np.ndarray:
        """One L2-normalised float32 query vector from exactly one of text / image / embedding."""
        given = [x is not None for x in (text, image, embedding)]
        if sum(given) != 1:
            raise QueryError("give exactly one of text, image or embedding")
        if text is not None:
            # "a red star:1|blurry:-0.5": weighted prompts, parsed as subset specs and guidance
            # parse them
            try:
                prompts = parse_prompts(text)
                v = combine(self.encoder.encode_texts([p.text for p in prompts]), prompts)
            except PromptError as exc:
                raise QueryError(f"text: {exc}") from None
        elif image is not None:
            v = self.encoder.encode_images([image])[0]
        else:
            v = np.asarray(embedding, dtype=np.float32).reshape(-1)
        norm = float(np.linalg.norm(v))
        if not np.isfinite(norm) or norm == 0:
            raise QueryError("query embedding is zero or not finite")
        return (v / norm).astype(np.float32)

    def query(
        self,
        text: str | None = None,
        image: Any = None,
        embedding: Sequence[float] | None = None,
        k: int = 10,
        modality: str = S.MODALITY_IMAGE,
        filters: str | None = None,
        deduplicate: bool = True,
        safe_mode: bool = False,
        punsafe_max: float = PUNSAFE_MAX,
        pwatermark_max: float = PWATERMARK_MAX,
        hide_watermarked: bool | None = None,
    ) -> Results:
        """Top-k rows (metadata + id + similarity) for one query; `.exact` on the answer says
        whether they are the exact best rows or the index's approximate ones."""
        return self.search_vectors(
            self.embed(text, image, embedding)[None, :],
            k,
            modality,
            filters,
            deduplicate,
            safe_mode,
            punsafe_max,
            pwatermark_max,
            hide_watermarked,
        )[0]

    def vector(
        self, ids: Sequence[int] | np.ndarray, modality: str = S.MODALITY_IMAGE
    ) -> np.ndarray:
        """The stored float32 embeddings of given ids
        ("more like this" queries with one of them)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.count):
            raise QueryError(f"ids: out of range 0..{self.count - 1}")
        if len(ids) and not self.visible(ids).all():
            raise QueryError("ids: a requested row is on the takedown list")
        return self.index(modality)[2].gather(ids)

    def search_vectors(
        self,
        queries: np.ndarray,
        k: int = 10,
        modality: str = S.MODALITY_IMAGE,
        filters: str | None = None,
        deduplicate: bool = True,
        safe_mode: bool = False,
        punsafe_max: float = PUNSAFE_MAX,
        pwatermark_max: float = PWATERMARK_MAX,
        hide_watermarked: bool | None = None,
    ) -> list[Results]:
        """Batched search: one faiss call for all queries, then per-query post-filtering. Every
        query gets k rows, or every row that passes when fewer do: where the first call falls
        short, a wider probe (`indices.exact.Planner`) or an exact scan finds the rest.

        `safe_mode` drops rows with `punsafe` above `punsafe_max`, and `hide_watermarked` rows
        with `pwatermark` above `pwatermark_max`; `hide_watermarked=None` follows `safe_mode`
        (clip back's safe mode, as the server uses it). Unscored rows pass both."""
        self.refresh_takedown()
        index, doc, store = self.index(modality)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != store.dim:
            raise QueryError(
                f"query dimension {queries.shape[-1]} does not match the index's {store.dim}"
            )
        if k < 1:
            raise QueryError("k must be at least 1")
        if hide_watermarked is None:
            hide_watermarked = safe_mode
        limits = [
            (col, limit)
            for col, limit, on in (
                (S.PUNSAFE, punsafe_max, safe_mode),
                (S.PWATERMARK, pwatermark_max, hide_watermarked),
            )
            if on
        ]
        planner = self._planner(modality)
        post = (store, filters, limits)
        depth = min(max(4 * k, int(doc.get("params", {}).get("rerank_k", 0)), 50), self.count)
        # the fast path: one faiss call for every query at the index's tuned settings
        scores, cand = index.search(queries, depth)
        out: list[Results] = []
        for q, found, approx in zip(queries, cand, scores):
            approx, found = approx[found >= 0], found[found >= 0]
            ids, sims = self._passing(q, found, *post, approx=approx)
            seen_all = len(found) >= self.count
            answer = self._answer(ids, sims, store, k, deduplicate, planner.default_exact())
            if seen_all:
                answer.exact = True
            elif not self._settled(answer, ids, k, deduplicate):
                # too few rows: widen the probe (as deep as the fast path asked for, or more
                # where the filters let few through), or scan exactly
                share = max(len(ids), 1) / max(len(found), 1)
                floor = depth if len(found) < depth else 2 * depth
                answer = self._widen(q, planner, post, k, deduplicate, want_for(k, share, floor))
            out.append(answer)
        return out

    def _planner(self, modality: str) -> Planner:
        index = self.index(modality)[0]
        with self._lock:
            if modality not in self._planners:
                self._planners[modality] = Planner(index)
            return self._planners[modality]

    @staticmethod
    def _settled(answer: list, ids: np.ndarray, k: int, deduplicate: bool) -> bool:
        """Whether an answer is final: k rows, or (with near-duplicate collapse) the widest
        collapse window full, beyond which rows are never looked at."""
        return len(answer) >= k or (deduplicate and len(ids) >= DEDUP_WINDOW_MAX)

    def _widen(
        self, q: np.ndarray, planner: Planner, post: tuple, k: int, deduplicate: bool, want: int
    ) -> Results:
        """Search with a probe wide enough for about `want` candidates, growing at the observed
        pass rate; an exact scan where that is cheaper (`Planner.probe`)."""
        while True:
            probe = planner.probe(q, want)
            if probe is None:
                return self._scan(q, post, k, deduplicate, want)
            found, approx = self._probe_search(planner, q, probe)
            ids, sims = self._passing(q, found, *post, approx=approx)
            seen_all = len(found) >= self.count
            answer = self._answer(ids, sims, post[0], k, deduplicate, probe.exhaustive or seen_all)
            if seen_all or self._settled(answer, ids, k, deduplicate):
                return answer
            share = max(len(ids), 1) / max(len(found), 1)
            want = want_for(k, share, 2 * probe.depth)

    def _scan(self, q: np.ndarray, post: tuple, k: int, deduplicate: bool, depth: int) -> Results:
        """The exact answer: every vector's similarity (a chunk at a time), then the best rows in
        growing slices through the filters until k pass or none are left."""
        everything = np.arange(self.count, dtype=np.int64)
        sims_all = exact_similarities(post[0], everything, q)
        ids, sims = np.zeros(0, np.int64), np.zeros(0, np.float32)
        done, m = 0, max(depth, 1)
        while True:
            m = min(m, self.count)
            order = top(everything, sims_all, m)[done:]
            i, s = self._passing(q, everything[order], *post, sims=sims_all[order])
            ids, sims = np.concatenate([ids, i]), np.concatenate([sims, s])
            answer = self._answer(ids, sims, post[0], k, deduplicate, True)
            if m >= self.count or self._settled(answer, ids, k, deduplicate):
                return answer
            done, m = m, m * 4

    @staticmethod
    def _probe_search(planner: Planner, q: np.ndarray, probe: Any) -> tuple[Any, Any]:
        """(candidate ids, their index scores) of one widened search."""
        scores, found = planner.index.search(q.reshape(1, -1), probe.depth, params=probe.params)
        ok = found[0] >= 0
        return found[0][ok], scores[0][ok]

    def _passing(
        self,
        q: np.ndarray,
        cand: np.ndarray,
        store: EmbeddingStore,
        filters: str | None,
        limits: list[tuple[str, float]],
        sims: np.ndarray | None = None,
        approx: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids, similarities) of the candidates that pass the takedown list, the score limits
        and the filter, best first (ties to the lower id). `sims`: exact ones already known;
        else the index's best `rerank_max` candidates are re-scored exactly from the
        collection's embeddings and the others keep their index scores (`approx`)."""
        keep = ~self.is_blocked(cand)  # takedown: always
        cand = cand[keep]
        depth = len(cand)
        if sims is None:
            depth = len(cand) if approx is None else min(len(cand), self.rerank_max)
            sims = np.empty(len(cand), np.float32)
            if depth < len(cand):
                sims[depth:] = approx[keep][depth:]
            # exact, from the collection's embeddings: a bounded number of rows
            sims[:depth] = exact_similarities(store, cand[:depth], q, merge_gap=0)
        else:
            sims = sims[keep]
        # the re-scored head first, then the rest in the index's order: compressed codes' scores
        # are biased, so they never outrank an exact one
        order = np.concatenate(
            [
                np.lexsort((cand[:depth], -sims[:depth])),
                depth + np.lexsort((cand[depth:], -sims[depth:])),
            ]
        )
        cand, sims = cand[order], sims[order]
        if limits:
            keep = np.ones(len(cand), dtype=bool)
            for col, limit in limits:  # unknown scores pass, as clip back does
                keep &= ~(self.rows.values(cand, col) > limit)
            cand, sims = cand[keep], sims[keep]
        if filters:
            keep = self._filter(cand, filters)
            cand, sims = cand[keep], sims[keep]
        return cand, sims

    def _answer(
        self,
        cand: np.ndarray,
        sims: np.ndarray,
        store: EmbeddingStore,
        k: int,
        deduplicate: bool,
        exact: bool,
    ) -> Results:
        """The first k passing rows as result rows, near-duplicates collapsed among the best
        DEDUP_MAX_CANDIDATES, or twice, four times... as many while that leaves fewer than k
        (DEDUP_WINDOW_MAX at most: bounded work)."""
        if deduplicate and len(cand) > 1:
            window = DEDUP_MAX_CANDIDATES
            while True:
                head = cand[:window]
                drop = duplicate_ids(store.gather(head, merge_gap=0))
                keep = np.array([i not in drop for i in range(len(head))])
                if keep.sum() >= k or window >= min(len(cand), DEDUP_WINDOW_MAX):
                    break
                window = min(2 * window, DEDUP_WINDOW_MAX)
            cand, sims = head[keep], sims[: len(head)][keep]
        return Results(self._rows(cand[:k], sims[:k]), exact)

    def _filter(self, ids: np.ndarray, where: str) -> np.ndarray:
        """Boolean mask of ids whose metadata (and `id`) satisfies the SQL WHERE clause.

        Untrusted SQL: it runs in `collection.sandbox`'s worker process (one SELECT, locked
        connection, time and memory limits), where the candidates are the only data there is.
        """
        if len(ids) > FILTER_BATCH:  # an exact scan's slices: the worker's memory stays bounded
            return np.concatenate(
                [
                    self._filter(ids[i : i + FILTER_BATCH], where)
                    for i in range(0, len(ids), FILTER_BATCH)
                ]
            )
        if not len(ids):
            return np.zeros(0, dtype=bool)
        frame = self.rows.take(ids)
        if (
            S.ID in frame.column_names
        ):  # a source column of that name: the global id wins, as in the catalog
            frame = frame.drop_columns([S.ID])
        frame = frame.append_column(S.ID, pa.array(np.asarray(ids, dtype=np.int64)))
        frame = frame.append_column("__pos", pa.array(np.arange(len(ids), dtype=np.int64)))
        if self._sandbox is None:
            # a pool with a queue per client: one user's hostile filter leaves a worker for others
            self._sandbox = SandboxPool(limits=self._filter_limits, label="filters")
        try:
            table, _, _ = self._sandbox.query(
                f"SELECT __pos FROM {FILTER_TABLE} WHERE {where}",
                row_cap=None,
                tables={FILTER_TABLE: frame},
            )
        except SqlError as exc:
            raise QueryError(f"filters: {exc}") from None
        try:
            pos = table.column(0).drop_null().cast(pa.int64()).to_numpy()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, IndexError) as exc:
            raise QueryError(
                f"filters: the clause changed what the filter selects: {exc}"
            ) from None
        mask = np.zeros(len(ids), dtype=bool)
        mask[pos[(pos >= 0) & (pos < len(ids))]] = True  # a UNION in the clause cannot add rows
        return mask

    def close(self) -> None:
        """Stop the filters' worker processes (a later filtered query starts others)."""
        if self._sandbox is not None:
            self._sandbox.close()
            self._sandbox = None

    def _rows(self, ids: np.ndarray, sims: np.ndarray) -> list[dict[str, Any]]:
        """Result rows: the searcher's columns, then `id` and `similarity`."""
        records = self.rows.take(ids, self.columns).to_pylist()
        out = []
        for i, s, rec in zip(ids, sims, records):
            row = {c: _json_value(rec.get(c)) for c in self.columns}
            row["id"] = int(i)
            row["similarity"] = float(s)
            out.append(row)
        return out

    def metadata_for(
        self, ids: Sequence[int], columns: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        """Metadata of given ids (the searcher's columns, or the named ones); taken-down ids get
        empty metadata (never served)."""
        self.refresh_takedown()
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.count:
                raise QueryError(f"ids: {i} is out of range 0..{self.count - 1}")
        blocked = self.is_blocked(ids)
        cols = list(self.columns if columns is None else columns)
        records = self.rows.take(ids, cols).to_pylist()
        return [
            {
                "id": i,
                "metadata": {} if b else {c: _json_value(rec.get(c)) for c in cols if c in rec},
            }
            for i, b, rec in zip(ids, blocked, records)
        ]

    def records(self, ids: Sequence[int]) -> list[dict[str, Any]]:
        """Every metadata column of given ids (what a result's detail view shows); taken-down
        ids are left out."""
        return [
            dict(m["metadata"], id=m["id"])
            for m in self.metadata_for(ids, self.rows.column_names)
            if m["metadata"]
        ]
