"""What resolving one subset spec needs, loaded once and only when a clause asks for it: the
collection's catalog (SQL), the embedded rows that survive the takedown list, the FAISS
indices and embeddings, and the CLIP model that embeds query texts and images.

Row sets travel between clauses as sorted arrays of unique global ids (`collection.schema.ID`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from collection import schema as S
from collection.embeddings import EmbeddingStore
from collection.parts import CollectionError, complete_parts
from collection.storage import read_collection_json
from collection.takedown import Takedown
from curation.catalog import Catalog, SqlError
from curation.spec import SpecError
from curation.vectors import load_collection_index

if TYPE_CHECKING:  # annotations only: torch loads where a model is loaded
    from models.clip import Clip

log = logging.getLogger(__name__)


def ids_array(values: Any) -> np.ndarray:
    """A sorted array of unique int64 ids (the form every clause takes and returns)."""
    return np.unique(np.asarray(values, dtype=np.int64))


@dataclass
class Context:
    """One resolution's view of the collection; `source` names the spec in error messages."""

    collection: str
    source: str = "<spec>"
    base_dir: str = "."
    seed: int = 0
    untrusted: bool = False
    encoder: Clip | None = None
    _catalog: Any = None
    _guarded: Any = None
    _base: pa.Table | None = None
    _blocked: int | None = None
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
            # above every row the collection has (collection.json's count, else the embedded
            # rows): an incremental resolve that starts from cached rows never reads `base`
            rows = int(self.info.get("count") or 0) or len(self.base)
            self._guarded = Catalog(self.collection, untrusted=True, row_cap=rows + 1)
        try:
            result = self._guarded.query(sql)
        except SqlError as exc:
            raise SpecError(f"{self.source}: {what}: {exc}") from None
        if result.truncated and self.info.get("count"):  # a stale count: size the cap by the rows
            self._guarded.close()
            self._guarded = Catalog(self.collection, untrusted=True, row_cap=len(self.base) + 1)
            self.info = {**self.info, "count": None}
            return self.where_ids(where, what)
        if result.truncated:
            raise SpecError(
                f"{self.source}: {what}: more rows than the collection has embedded ones"
            )
        return ids_array(result.table[S.ID].to_numpy(zero_copy_only=False))

    # ---- the rows a spec starts from -----------------------------------------------------
    @property
    def base(self) -> pa.Table:
        """id, key, url, sha256 of every embedded row, by id; the takedown list is applied at
        once."""
        if self._base is None:
            table = self.query(
                f"SELECT {S.ID}, {S.KEY}, {S.URL}, {S.SHA256} FROM samples "
                f"WHERE {S.ID} IS NOT NULL ORDER BY {S.ID}",
                "collection",
            )
            blocked = Takedown.load(self.collection).blocked_mask(table)
            self._blocked = int(np.count_nonzero(blocked))
            self._base = table.filter(pa.array(~np.asarray(blocked, dtype=bool)))
        return self._base

    @property
    def blocked(self) -> int:
        """Embedded rows the takedown list removed from `base`."""
        if self._blocked is None:
            _ = self.base
        return int(self._blocked or 0)

    def base_ids(self) -> np.ndarray:
        """The ids of `base`; with no takedown list, read alone (not keys, urls and hashes:
        a tenth of the memory on a large collection)."""
        if self._base is None and not len(Takedown.load(self.collection)):
            self._blocked = 0
            sql = f"SELECT {S.ID} FROM samples WHERE {S.ID} IS NOT NULL ORDER BY {S.ID}"
            return ids_array(self.query(sql, "collection")[S.ID].to_numpy(zero_copy_only=False))
        return ids_array(self.base[S.ID].to_numpy(zero_copy_only=False))

    def keys(self, ids: np.ndarray) -> list[str]:
        """The keys of `ids` (all in `base`), in the order given."""
        return self._take(ids, S.KEY)

    def ids_of_keys(self, keys: list[str], what: str) -> np.ndarray:
        """Ids of the given keys, in order; a key that is absent or taken down is a SpecError."""
        pos = pc.index_in(pa.array(keys, pa.string()), value_set=self.base[S.KEY].combine_chunks())
        if pos.null_count:
            missing = keys[pos.is_null().to_pylist().index(True)]
            raise SpecError(
                f"{self.source}: {what}: key {missing!r} is not an embedded, visible row of "
                f"{self.collection}"
            )
        return self.base[S.ID].to_numpy()[pos.to_numpy()]

    def _take(self, ids: np.ndarray, column: str) -> list[Any]:
        all_ids = self.base[S.ID].to_numpy(zero_copy_only=False)
        pos = np.searchsorted(all_ids, ids)
        if len(ids) and (
            pos.max(initial=0) >= len(all_ids) or not np.array_equal(all_ids[pos], ids)
        ):
            raise SpecError(f"{self.source}: ids outside the collection's visible rows")
        return self.base[column].take(pa.array(pos)).to_pylist()

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
            if cat is not None:
                cat.close()
        self._catalog = self._guarded = None
