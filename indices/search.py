"""Search a collection: `Searcher(collection).query(text=..., image=..., embedding=...)`.

Results are rows of metadata plus `id` (global vector id) and `similarity`. The takedown
list is always applied, and re-read within about a second of a change (`refresh_takedown`);
near-duplicate collapse, safe mode and SQL-style metadata filters (a DuckDB WHERE clause
over the candidate rows, run in `curation.sandbox`'s locked worker process with time and
memory limits) are options.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from curation import schema as S
from curation.sandbox import Limits, Sandbox, SqlError
from curation.storage import read_collection_json
from curation.takedown import TakedownWatch
from indices.build import load_index
from indices.store import CollectionError, EmbeddingStore, read_metadata
from indices.tune import set_search_params
from models.clip import load_clip
from models.prompts import PromptError, combine, parse_prompts

log = logging.getLogger(__name__)

DEDUP_THRESHOLD = 0.94
PUNSAFE_MAX = 0.5
PWATERMARK_MAX = 0.8
#: Columns returned by default (clip back returns url/caption; we add our scores).
DEFAULT_COLUMNS = (S.KEY, S.URL, S.CAPTION, S.WIDTH, S.HEIGHT, S.CLIP_SIMILARITY, S.PUNSAFE, S.PWATERMARK)
#: what one `filters=` WHERE clause may use: the candidates of one query are a few thousand rows at most
FILTER_LIMITS = Limits(timeout_s=5.0, memory_limit="256MB", threads=1)
#: the table a filter's WHERE clause reads; `__pos` is the candidate's position
FILTER_TABLE = "candidates"


class QueryError(ValueError):
    """A query the searcher cannot answer (bad filter, wrong dimension, no input)."""


def duplicate_ids(vectors: np.ndarray, threshold: float = DEDUP_THRESHOLD) -> set[int]:
    """Positions to drop: all but the first member of each connected component of the
    graph linking rows with cosine >= threshold (the first is the best-ranked)."""
    sims = vectors @ vectors.T
    n = len(vectors)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(sims >= threshold, 1))):
        a, b = find(int(i)), find(int(j))
        if a != b:
            parent[max(a, b)] = min(a, b)
    return {i for i in range(n) if find(i) != i}


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, np.generic):
        return _json_value(v.item())
    return v


class Searcher:
    """Loads a collection's indices (memory-mapped), metadata and takedown list once."""

    def __init__(self, collection: str, encoder: Any = None, mmap: bool = True,
                 columns: Sequence[str] | None = DEFAULT_COLUMNS, filter_limits: Limits = FILTER_LIMITS) -> None:
        self.root = collection
        self.layout = S.CollectionLayout(collection)
        self.info = read_collection_json(collection)
        self._encoder = encoder
        self._mmap = mmap
        self._lock = threading.Lock()
        self._indices: dict[str, tuple[Any, dict[str, Any], EmbeddingStore]] = {}
        table = read_metadata(collection)
        self.columns = [c for c in (columns or table.column_names) if c in table.column_names]
        self.metadata = table.to_pandas()
        self.count = len(self.metadata)
        self._watch = TakedownWatch(collection)
        self.blocked = self._watch.takedown.blocked_mask(self.metadata)
        #: bumped whenever the takedown list changes (the server drops its result cache then)
        self.takedown_version = 0
        self._filter_limits = filter_limits
        self._sandbox: Sandbox | None = None
        if self.blocked.any():
            log.info("%s: takedown list blocks %d rows", self.layout.takedown, int(self.blocked.sum()))

    # ---- loading -------------------------------------------------------------------------
    def refresh_takedown(self) -> bool:
        """Re-read takedown.parquet if it changed (checked at most once a second); whether it did."""
        takedown, changed = self._watch.poll()
        if changed:
            self.blocked = takedown.blocked_mask(self.metadata)
            self.takedown_version += 1
            log.info("%s: takedown list now blocks %d rows", self.layout.takedown, int(self.blocked.sum()))
        return changed

    def modalities(self) -> list[str]:
        return [m for m in S.MODALITIES if os.path.exists(self.layout.index(m))]

    def index(self, modality: str) -> tuple[Any, dict[str, Any], EmbeddingStore]:
        """(faiss index, its json, embedding store) for a modality, loaded once."""
        with self._lock:
            if modality not in self._indices:
                if modality not in S.MODALITIES:
                    raise QueryError(f"modality: unknown {modality!r}; expected one of {list(S.MODALITIES)}")
                idx = load_index(self.layout.index(modality), self._mmap)
                with open(self.layout.index_json(modality)) as fh:
                    doc = json.load(fh)
                set_search_params(idx, doc.get("params", {}))
                store = EmbeddingStore.open(self.root, modality)
                if store.count != self.count:
                    raise CollectionError(f"{self.root}: {store.count} {modality} vectors but {self.count} metadata rows")
                self._indices[modality] = (idx, doc, store)
            return self._indices[modality]

    @property
    def encoder(self) -> Any:
        """The collection's CLIP model (collection.json's spec), loaded on first text/image query."""
        if self._encoder is None:
            self._encoder = load_clip(self.info.get("clip_model", "sieve-tiny"))
        return self._encoder

    # ---- querying ------------------------------------------------------------------------
    def embed(self, text: str | None = None, image: Any = None, embedding: Sequence[float] | None = None) -> np.ndarray:
        """One L2-normalised float32 query vector from exactly one of text / image / embedding."""
        given = [x is not None for x in (text, image, embedding)]
        if sum(given) != 1:
            raise QueryError("give exactly one of text, image or embedding")
        if text is not None:
            try:  # "a red star:1|blurry:-0.5": weighted prompts, parsed as subset specs and guidance parse them
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

    def query(self, text: str | None = None, image: Any = None, embedding: Sequence[float] | None = None,
              k: int = 10, modality: str = S.MODALITY_IMAGE, filters: str | None = None,
              deduplicate: bool = True, safe_mode: bool = False, punsafe_max: float = PUNSAFE_MAX,
              pwatermark_max: float = PWATERMARK_MAX) -> list[dict[str, Any]]:
        """Top-k rows (metadata + id + similarity) for one query."""
        return self.search_vectors(self.embed(text, image, embedding)[None, :], k, modality, filters,
                                   deduplicate, safe_mode, punsafe_max, pwatermark_max)[0]

    def search_vectors(self, queries: np.ndarray, k: int = 10, modality: str = S.MODALITY_IMAGE,
                       filters: str | None = None, deduplicate: bool = True, safe_mode: bool = False,
                       punsafe_max: float = PUNSAFE_MAX, pwatermark_max: float = PWATERMARK_MAX) -> list[list[dict[str, Any]]]:
        """Batched search: one faiss call for all queries, then per-query post-filtering.
        Fetches more candidates while filters leave fewer than k rows."""
        self.refresh_takedown()
        index, doc, store = self.index(modality)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != store.dim:
            raise QueryError(f"query dimension {queries.shape[-1]} does not match the index's {store.dim}")
        if k < 1:
            raise QueryError("k must be at least 1")
        out: list[list[dict[str, Any]] | None] = [None] * len(queries)
        todo = list(range(len(queries)))
        depth = max(4 * k, int(doc.get("params", {}).get("rerank_k", 0)), 50)
        while todo:
            depth = min(depth, self.count)
            _, cand = index.search(queries[todo], depth)
            again = []
            for r, qi in enumerate(todo):
                rows = self._post(queries[qi], cand[r], store, k, filters, deduplicate, safe_mode, punsafe_max, pwatermark_max)
                if len(rows) < k and depth < self.count and depth < 8192:
                    again.append(qi)
                else:
                    out[qi] = rows
            todo, depth = again, depth * 4
        return [o or [] for o in out]

    def _post(self, q: np.ndarray, cand: np.ndarray, store: EmbeddingStore, k: int, filters: str | None,
              deduplicate: bool, safe_mode: bool, punsafe_max: float, pwatermark_max: float) -> list[dict[str, Any]]:
        cand = cand[cand >= 0]
        cand = cand[~self.blocked[cand]]  # takedown: always
        vecs = store.gather(cand)
        sims = vecs @ q  # exact similarity from the collection's own embeddings
        order = np.argsort(-sims, kind="stable")
        cand, sims, vecs = cand[order], sims[order], vecs[order]
        if safe_mode:
            meta = self.metadata
            keep = np.ones(len(cand), dtype=bool)
            for col, limit in ((S.PUNSAFE, punsafe_max), (S.PWATERMARK, pwatermark_max)):
                if col in meta.columns:
                    vals = meta[col].to_numpy(dtype=float, na_value=np.nan)[cand]
                    keep &= ~(vals > limit)  # unknown scores pass, as clip back does
            cand, sims, vecs = cand[keep], sims[keep], vecs[keep]
        if filters:
            keep = self._filter(cand, filters)
            cand, sims, vecs = cand[keep], sims[keep], vecs[keep]
        if deduplicate and len(cand) > 1:
            drop = duplicate_ids(vecs)
            keep = np.array([i not in drop for i in range(len(cand))])
            cand, sims = cand[keep], sims[keep]
        return [self._row(int(i), float(s)) for i, s in zip(cand[:k], sims[:k])]

    def _filter(self, ids: np.ndarray, where: str) -> np.ndarray:
        """Boolean mask of ids whose metadata (and `id`) satisfies the SQL WHERE clause.

        Untrusted SQL: it runs in `curation.sandbox`'s worker process (one SELECT, locked
        connection, time and memory limits), where the candidates are the only data there is.
        """
        if not len(ids):
            return np.zeros(0, dtype=bool)
        frame = self.metadata.iloc[ids].copy()
        frame[S.ID] = np.asarray(ids, dtype=np.int64)
        frame["__pos"] = np.arange(len(ids))
        if self._sandbox is None:
            self._sandbox = Sandbox(limits=self._filter_limits, label="filters")
        try:
            table, _, _ = self._sandbox.query(f"SELECT __pos FROM {FILTER_TABLE} WHERE {where}", row_cap=None,
                                              tables={FILTER_TABLE: pa.Table.from_pandas(frame, preserve_index=False)})
        except SqlError as exc:
            raise QueryError(f"filters: {exc}") from None
        try:
            pos = table.column(0).drop_null().cast(pa.int64()).to_numpy()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, IndexError) as exc:
            raise QueryError(f"filters: the clause changed what the filter selects: {exc}") from None
        mask = np.zeros(len(ids), dtype=bool)
        mask[pos[(pos >= 0) & (pos < len(ids))]] = True  # a UNION in the clause cannot add rows
        return mask

    def close(self) -> None:
        """Stop the filters' worker process (a later filtered query starts another)."""
        if self._sandbox is not None:
            self._sandbox.close()

    def _row(self, i: int, similarity: float) -> dict[str, Any]:
        rec = self.metadata.iloc[i]
        row = {c: _json_value(rec[c]) for c in self.columns}
        row["id"] = i
        row["similarity"] = similarity
        return row

    def metadata_for(self, ids: Sequence[int]) -> list[dict[str, Any]]:
        """Metadata of given ids; taken-down ids get empty metadata (never served)."""
        self.refresh_takedown()
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.count:
                raise QueryError(f"ids: {i} is out of range 0..{self.count - 1}")
            meta = {} if self.blocked[i] else {c: _json_value(self.metadata.iloc[i][c]) for c in self.columns}
            out.append({"id": i, "metadata": meta})
        return out
