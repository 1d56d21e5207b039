"""What resolving one subset spec needs, loaded once and only when a clause asks for it: the
collection's catalog (SQL), the embedded rows that survive the takedown list, the FAISS
indices and embeddings, and the CLIP model that embeds query texts and images.

Row sets travel between clauses as sorted arrays of unique global ids (`collection.schema.ID`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import duckdb
import numpy as np
import pyarrow as pa

from collection import schema as S
from collection.embeddings import EmbeddingStore
from collection.parts import CollectionError, complete_parts
from collection.sandbox import one_line
from collection.sandbox_pool import POOL_WORKERS
from collection.storage import read_collection_json
from collection.takedown import Takedown
from curation.catalog import Catalog, SqlError
from curation.spec import SpecError
from curation.vectors import load_collection_index

if TYPE_CHECKING:  # annotations only: torch loads where a model is loaded
    from curation.concept_scores import Scorer
    from models.clip import Clip

log = logging.getLogger(__name__)

#: ids asked of the sandbox per query: 32 MB of BIGINT, half its result limit
WHERE_WINDOW = 4_000_000

#: rows per Arrow batch when the visible ids are read: what bounds that read's memory
BATCH_ROWS = 1 << 18


#: a set of ids spanning at most this many times its size is sorted through a bitmap (linear)
DENSE = 64


def _bitmap(values: np.ndarray) -> np.ndarray | None:
    """A boolean mask over 0..max of non-negative `values` when they are dense enough for it to
    be cheaper than a sort; None otherwise."""
    if not len(values) or values.min() < 0 or values.max() >= DENSE * len(values) + 1024:
        return None
    mask = np.zeros(int(values.max()) + 1, dtype=bool)
    mask[values] = True
    return mask


def ids_array(values: Any) -> np.ndarray:
    """A sorted array of unique int64 ids (the form every clause takes and returns); a dense set
    (a where clause's millions of ids) through a bitmap, in one linear pass, not a sort."""
    values = np.asarray(values, dtype=np.int64).reshape(-1)
    mask = _bitmap(values)
    return np.unique(values) if mask is None else np.flatnonzero(mask).astype(np.int64)


def intersect(ids: np.ndarray, other: np.ndarray) -> np.ndarray:
    """The ids (sorted, unique) that are also in `other` (sorted, unique): what narrowing by a
    clause is, linear through a bitmap of `other` when that is dense."""
    mask = _bitmap(other)
    if mask is None:
        return np.intersect1d(ids, other, assume_unique=True)
    inside = ids[ids < len(mask)]
    return inside[mask[inside]]


def sandbox_catalog(collection: str, workers: int = POOL_WORKERS) -> Catalog:
    """A sandboxed catalog for a spec's own SQL, its row cap above every embedded row (the
    parts' footers count them), so a where clause's ids are never cut short."""
    catalog = Catalog(collection, untrusted=True, workers=workers)
    catalog.row_cap = catalog.parts.ok_rows + 1
    return catalog


@dataclass
class Context:
    """One resolution's view of the collection; `source` names the spec in error messages."""

    collection: str
    source: str = "<spec>"
    base_dir: str = "."
    seed: int = 0
    untrusted: bool = False
    encoder: Clip | None = None
    #: a sandboxed catalog the caller keeps between resolutions (its workers stay started);
    #: None: one of this resolution's own, closed with it
    sandbox: Catalog | None = None
    #: scores a concept clause's rows when its saved scores are not current (the web UI's
    #: encoder process); None: scored in this process
    scorer: Scorer | None = None
    _catalog: Any = None
    _guarded: Any = None
    _ids: np.ndarray | None = None
    _blocked: int = 0
    _indices: dict[str, tuple[Any, dict[str, Any], EmbeddingStore]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            complete_parts(self.collection)
        except CollectionError as exc:
            raise SpecError(f"{self.source}: collection {self.collection}: {exc}") from None
        self.info = read_collection_json(self.collection)

    # ---- SQL -----------------------------------------------------------------------------
    @property
    def catalog(self) -> Catalog:
        """The trusted catalog (every row: no cap unless a query asks): Sieve's own queries."""
        if self._catalog is None:
            self._catalog = Catalog(self.collection)
        return self._catalog

    def query(self, sql: str, what: str) -> pa.Table:
        """Sieve's own SQL on the trusted catalog; `what` names the clause in errors."""
        try:
            result = self.catalog.query(sql)
        except SqlError as exc:
            raise SpecError(f"{self.source}: {what}: {exc}") from None
        return result.table

    def where_ids(self, where: str, what: str) -> np.ndarray:
        """Ids of embedded rows matching a WHERE clause; a spec's own SQL runs sandboxed when
        `untrusted` (the web UI), with the row cap set above the collection's size."""
        sql = f"SELECT {S.ID} FROM samples WHERE {S.ID} IS NOT NULL AND ({where})"
        if not self.untrusted:
            return ids_array(self.query(sql, what)[S.ID].to_numpy(zero_copy_only=False))
        if self._guarded is None:
            self._guarded = self.sandbox or sandbox_catalog(self.collection)
        # one query per window of ids: a 10M-row answer would pass the sandbox's result limit
        # (collection.sandbox.MAX_RESULT_BYTES); the last window is open-ended
        bound = self._guarded.row_cap
        found = []
        for lo in range(0, max(bound, 1), WHERE_WINDOW):
            hi = f" AND {S.ID} < {lo + WHERE_WINDOW}" if lo + WHERE_WINDOW < bound else ""
            try:
                result = self._guarded.query(f"{sql} AND {S.ID} >= {lo}{hi}")
            except SqlError as exc:
                raise SpecError(f"{self.source}: {what}: {exc}") from None
            if result.truncated:
                raise SpecError(
                    f"{self.source}: {what}: more rows than the collection has embedded ones"
                )
            found.append(result.table[S.ID].to_numpy(zero_copy_only=False))
        return ids_array(np.concatenate(found))

    # ---- the rows a spec starts from -----------------------------------------------------
    def _visible(self) -> np.ndarray:
        """Sorted ids of every embedded row the takedown list leaves, read in batches: only the
        ids stay (8 bytes a row), never the rows' keys, urls or hashes."""
        if self._ids is None:
            takedown = Takedown.load(self.collection)
            columns = [S.ID] + ([S.KEY, S.URL, S.SHA256] if len(takedown) else [])
            # no ORDER BY: DuckDB would hold every selected column to sort; the ids sort here
            sql = f"SELECT {', '.join(columns)} FROM samples WHERE {S.ID} IS NOT NULL"
            kept, blocked = [], 0
            for batch in self._batches(sql, "collection"):
                ids = batch.column(0).to_numpy(zero_copy_only=False).astype(np.int64)
                if len(takedown):
                    mask = np.asarray(
                        takedown.blocked_mask(pa.Table.from_batches([batch])), dtype=bool
                    )
                    blocked += int(np.count_nonzero(mask))
                    ids = ids[~mask]
                kept.append(ids)
            self._ids = np.sort(np.concatenate(kept)) if kept else np.zeros(0, np.int64)
            self._blocked = blocked
        return self._ids

    def _batches(self, sql: str, what: str) -> Any:
        """The trusted catalog's answer to `sql` as a stream of Arrow record batches."""
        try:
            return self.catalog.connection.sql(sql).to_arrow_reader(BATCH_ROWS)
        except duckdb.Error as exc:
            raise SpecError(f"{self.source}: {what}: {one_line(exc)}") from None

    def _joined(self, want: pa.Table, sql: str, what: str) -> pa.Table:
        """`sql` run with `want` registered as table `_want` (a join in DuckDB, not a Python
        dict over the collection's keys)."""
        try:
            return self.catalog.joined(want, sql)
        except SqlError as exc:
            raise SpecError(f"{self.source}: {what}: {exc}") from None

    @property
    def blocked(self) -> int:
        """Embedded rows the takedown list removed from the visible rows."""
        self._visible()
        return self._blocked

    def base_ids(self) -> np.ndarray:
        return self._visible()

    def keys(self, ids: np.ndarray) -> list[str]:
        """The keys of `ids` (all visible), in the order given."""
        ids = np.asarray(ids, dtype=np.int64)
        visible = self._visible()
        pos = np.searchsorted(visible, ids)
        if len(ids) and (
            pos.max(initial=0) >= len(visible) or not np.array_equal(visible[pos], ids)
        ):
            raise SpecError(f"{self.source}: ids outside the collection's visible rows")
        want = pa.table({"i": pa.array(ids), "pos": pa.array(np.arange(len(ids)))})
        got = self._joined(
            want,
            f"SELECT s.{S.KEY} AS k FROM samples s JOIN _want w ON s.{S.ID} = w.i ORDER BY w.pos",
            "keys",
        )
        return got.column("k").to_pylist()

    def ids_of_keys(self, keys: list[str], what: str) -> np.ndarray:
        """Ids of the given keys, in order; a key that is absent or taken down is a SpecError."""
        want = pa.table({"k": pa.array(keys, pa.string()), "pos": pa.array(np.arange(len(keys)))})
        got = self._joined(
            want,
            f"SELECT w.pos AS pos, s.{S.ID} AS i FROM _want w LEFT JOIN samples s "
            f"ON s.{S.KEY} = w.k AND s.{S.ID} IS NOT NULL ORDER BY w.pos",
            what,
        )
        column = got.column("i")
        ids = column.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        visible = self._visible()
        pos = np.searchsorted(visible, ids)
        ok = column.is_valid().to_numpy(zero_copy_only=False) & (pos < len(visible))
        ok[ok] = visible[pos[ok]] == ids[ok]  # taken down: embedded but not visible
        if not ok.all():
            missing = keys[int(np.argmin(ok))]
            raise SpecError(
                f"{self.source}: {what}: key {missing!r} is not an embedded, visible row of "
                f"{self.collection}"
            )
        return ids

    def captions(self, ids: np.ndarray, n: int = 3) -> list[str]:
        """Captions of the first n ids (a dry run's examples)."""
        head = [int(i) for i in ids[:n]]
        if not head:
            return []
        table = self.query(
            f"SELECT {S.ID}, {S.CAPTION} FROM samples "
            f"WHERE {S.ID} IN ({', '.join(map(str, head))})",
            "captions",
        )
        by_id = dict(zip(table[S.ID].to_pylist(), table[S.CAPTION].to_pylist()))
        return [by_id.get(i) or "" for i in head]

    # ---- vectors -------------------------------------------------------------------------
    @property
    def clip_model(self) -> str:
        """The collection's CLIP spec (collection.json; sieve-tiny, the embed default, when
        absent)."""
        return self.info.get("clip_model", "sieve-tiny")

    def clip(self) -> Clip:
        """The collection's CLIP model (collection.json's spec), loaded on first use."""
        if self.encoder is None:
            # torch and open_clip only when no encoder was given (the web UI passes its
            # encoder process's client, so its own process never loads them)
            from models.clip import load_clip

            self.encoder = load_clip(self.clip_model)
        return self.encoder

    def index(self, modality: str, what: str) -> tuple[Any, dict[str, Any], EmbeddingStore]:
        """(faiss index with its tuned search parameters, its json, the embeddings) of a
        modality."""
        if modality not in self._indices:
            try:
                index, doc = load_collection_index(self.collection, modality)
                store = EmbeddingStore.open(self.collection, modality)
            except CollectionError as exc:
                raise SpecError(f"{self.source}: {what}: {exc}") from None
            if store.count != index.ntotal:
                raise SpecError(
                    f"{self.source}: {what}: the {modality} index holds {index.ntotal} vectors "
                    f"but the collection {store.count}; rebuild it with `python -m indices.build`"
                )
            self._indices[modality] = (index, doc, store)
        return self._indices[modality]

    def close(self) -> None:
        for cat in (self._catalog, self._guarded):
            if cat is not None and cat is not self.sandbox:
                cat.close()
        self._catalog = self._guarded = None
