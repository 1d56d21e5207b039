"""Result rows looked up by global id from memory-mapped Arrow files, as clip back does.

A searcher answering over a LAION-sized collection cannot hold every metadata row in memory
(strings make a pandas frame of a million rows weigh about a gigabyte). `RowStore` keeps, per
complete part, an uncompressed Arrow IPC file of that part's embedded rows in `emb_row` order
(`indices/rows/rows_{N}.arrow`) and memory-maps it: looking up k rows touches only the pages
holding them, and the process's memory does not grow with the collection.

The Arrow files are a cache of the Parquet parts, rebuilt whenever a part's signature (size,
mtime, etag: `collection.storage.file_signature`) changes; it is recorded in each file's
schema metadata.
`indices.build` writes them; a searcher writes any that are missing. A collection that cannot
be written to (read-only, or on an object store) gets them in its cache folder instead
(`indices.local.cache_folder`, under `$SIEVE_CACHE`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from collection import schema as S
from collection.parts import (
    CollectionError,
    by_part,
    complete_parts,
    part_offsets,
    read_part_metadata,
)
from collection.storage import atomic_path, is_local, url_to_fs
from indices.local import cache_folder, signature as source_signature

log = logging.getLogger(__name__)

#: bumped when the files' content rules change, so old caches are rebuilt
ROWS_VERSION = 1
_META_KEY = b"sieve.rows"


def _open_ipc(path: str) -> tuple[pa.Table, dict[str, Any] | None]:
    """(memory-mapped table, its recorded source signature) of a rows file."""
    reader = pa.ipc.open_file(pa.memory_map(path, "r"))
    meta = reader.schema.metadata or {}
    signature = json.loads(meta[_META_KEY]) if _META_KEY in meta else None
    return reader.read_all(), signature


def _write_ipc(path: str, table: pa.Table, signature: dict[str, Any]) -> None:
    schema = table.schema.with_metadata(
        {**(table.schema.metadata or {}), _META_KEY: json.dumps(signature).encode()}
    )
    with atomic_path(path) as tmp:
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            # uncompressed, one batch: a memory-mapped read is then zero-copy
            writer.write_table(table.cast(schema).combine_chunks())


def rows_dirs(root: str) -> list[str]:
    """Where a collection's rows files may live, in order of preference: inside the collection
    (local only), then the collection's cache folder (`indices.local.cache_folder`)."""
    out = []
    if is_local(root):
        out.append(S.CollectionLayout(url_to_fs(root)[1]).rows_dir)
    out.append(S.CollectionLayout(cache_folder(root)).rows_dir)
    return out


@dataclass
class RowStore:
    """The embedded rows of every complete part, memory-mapped, addressed by global id."""

    root: str
    parts: list[int]
    tables: list[pa.Table]
    offsets: np.ndarray
    schema: pa.Schema

    @classmethod
    def open(cls, root: str) -> "RowStore":
        """Map each complete part's rows file, writing the ones missing or stale first."""
        parts = complete_parts(root)
        dirs = rows_dirs(root)
        tables = [_part_table(root, n, dirs) for n in parts]
        offsets = part_offsets([t.num_rows for t in tables])
        try:
            schema = pa.unify_schemas(
                [t.schema.remove_metadata() for t in tables], promote_options="permissive"
            )
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise CollectionError(
                f"{root}: metadata parts disagree on a column's type: {exc}"
            ) from None
        return cls(root, parts, tables, offsets, schema)

    @property
    def count(self) -> int:
        """Embedded rows: the number of vectors each index holds."""
        return int(self.offsets[-1])

    @property
    def column_names(self) -> list[str]:
        return list(self.schema.names)

    def take(
        self, ids: Sequence[int] | np.ndarray, columns: Sequence[str] | None = None
    ) -> pa.Table:
        """Rows of the given global ids, in that order (columns a part lacks are null).

        Reads per part (like `EmbeddingStore.gather`): a take on one table spanning many
        memory-mapped chunks would concatenate whole columns first.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        names = [
            c
            for c in (columns if columns is not None else self.schema.names)
            if c in self.schema.names
        ]
        schema = pa.schema([self.schema.field(c) for c in names])
        if not len(ids):
            return schema.empty_table()
        if ids.min() < 0 or ids.max() >= self.count:
            bad = int(ids[(ids < 0) | (ids >= self.count)][0])
            raise IndexError(f"row id {bad} is out of range 0..{self.count - 1}")
        pieces, order = [], []
        for p, sel, rows in by_part(self.offsets, ids):
            table = self.tables[p]
            local = pa.array(rows)
            cols = [
                table.column(c).take(local)
                if c in table.column_names
                else pa.nulls(len(sel), schema.field(c).type)
                for c in names
            ]
            pieces.append(
                pa.Table.from_arrays(
                    [_cast(c, schema.field(n).type) for c, n in zip(cols, names)], schema=schema
                )
            )
            order.append(sel)
        out = pa.concat_tables(pieces) if len(pieces) > 1 else pieces[0]
        pos = np.empty(len(ids), dtype=np.int64)
        pos[np.concatenate(order)] = np.arange(len(ids))
        return out.take(pa.array(pos))

    def values(self, ids: Sequence[int] | np.ndarray, column: str) -> np.ndarray:
        """float64 values of one numeric column for the given ids (NaN where null or absent)."""
        if column not in self.schema.names:
            return np.full(len(ids), np.nan)
        col = self.take(ids, [column]).column(0).cast(pa.float64())
        return pc.fill_null(col, np.nan).to_numpy()


def _cast(col: Any, type_: pa.DataType) -> Any:
    return col if col.type == type_ else col.cast(type_)


def _part_table(root: str, n: int, dirs: list[str]) -> pa.Table:
    """Part n's rows, memory-mapped from the first current rows file; written when none is."""
    src = S.CollectionLayout(root).metadata(n)
    try:
        signature = {"version": ROWS_VERSION, **source_signature(src)}
    except FileNotFoundError:
        raise CollectionError(f"{src}: missing metadata part") from None
    name = S.rows_name(n)
    for d in dirs:
        path = os.path.join(d, name)
        if os.path.exists(path):
            try:
                table, recorded = _open_ipc(path)
            except (OSError, pa.ArrowInvalid) as exc:
                log.warning("%s: unreadable rows file, rebuilding: %s", path, exc)
                continue
            if recorded == signature:
                return table
    table = read_part_metadata(root, n, ok_only=True)
    for d in dirs:
        path = os.path.join(d, name)
        try:
            _write_ipc(path, table, signature)
        except OSError as exc:  # a read-only collection: the next place (the cache) will do
            log.info("%s: cannot write rows file (%s); trying the next place", path, exc)
            continue
        return _open_ipc(path)[0]
    raise CollectionError(f"{src}: could not write its rows file in any of {dirs}")
