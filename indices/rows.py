"""Result rows looked up by global id from memory-mapped Arrow files, as clip back does.

A searcher answering over a LAION-sized collection cannot hold every metadata row in memory
(strings make a pandas frame of a million rows weigh about a gigabyte). `RowStore` keeps the
complete parts' embedded rows in `emb_row` order in uncompressed Arrow IPC files, one record
batch per part and one file per PARTS_PER_FILE consecutive part numbers
(`indices/rows/rows-group-{G}.arrow`), and memory-maps them: looking up k rows touches only the
pages holding them, the process's memory does not grow with the collection, and a collection
of 100k parts needs about a hundred maps, not one per part (Linux allows 65,530 by default).

The Arrow files are a cache of the Parquet parts: a group's file is rebuilt whenever one of its
parts' signatures (size, mtime, etag: `collection.storage.file_signature`) changes or a part
joins the group; the signatures are recorded in the file's schema metadata.
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
import pyarrow.parquet as pq

from collection import schema as S
from collection.parts import (
    CollectionError,
    by_part,
    complete_parts,
    part_offsets,
    read_part_metadata,
    unify_part_schemas,
)
from collection.storage import atomic_path, is_local, url_to_fs
from indices.local import cache_folder, signature as source_signature

log = logging.getLogger(__name__)

#: bumped when the files' content rules change, so old caches are rebuilt
ROWS_VERSION = 2
_META_KEY = b"sieve.rows"
#: consecutive part numbers sharing one rows file (one memory map)
PARTS_PER_FILE = 1024


def _open_ipc(path: str) -> tuple[list[pa.Table], dict[str, Any] | None]:
    """(memory-mapped table of each record batch, the recorded signatures) of a rows file."""
    reader = pa.ipc.open_file(pa.memory_map(path, "r"))
    meta = reader.schema.metadata or {}
    recorded = json.loads(meta[_META_KEY]) if _META_KEY in meta else None
    tables = [
        pa.Table.from_batches([reader.get_batch(i)]) for i in range(reader.num_record_batches)
    ]
    return tables, recorded


def _write_ipc(root: str, path: str, parts: list[int], recorded: dict[str, Any]) -> None:
    """One record batch per part, read and written one part at a time (a group of a thousand
    parts never sits in memory), under the parts' unified schema (a column a part lacks is
    null in its batch)."""
    layout = S.CollectionLayout(root)
    schemas = []
    for n in parts:
        fs, p = url_to_fs(layout.metadata(n))
        try:
            schemas.append(pq.read_schema(p, filesystem=fs).remove_metadata())
        except (OSError, pa.ArrowInvalid) as exc:
            raise CollectionError(
                f"{layout.metadata(n)}: unreadable metadata part: {exc}"
            ) from None
    schema = unify_part_schemas(schemas, root)
    schema = schema.with_metadata({_META_KEY: json.dumps(recorded).encode()})
    with atomic_path(path) as tmp:
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for n in parts:
                # uncompressed, one batch per part: a memory-mapped read is then zero-copy
                writer.write_batch(_batch(read_part_metadata(root, n, ok_only=True), schema))


def _batch(table: pa.Table, schema: pa.Schema) -> pa.RecordBatch:
    """`table` as one record batch of `schema` (absent columns null)."""
    arrays = []
    for f in schema:
        if f.name not in table.column_names:
            arrays.append(pa.nulls(table.num_rows, f.type))
            continue
        col = _cast(table.column(f.name), f.type)
        arrays.append(col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col)
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


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
        """Map the complete parts' rows files, writing the ones missing or stale first."""
        parts = complete_parts(root)
        dirs = rows_dirs(root)
        tables: list[pa.Table] = []
        for group in _groups(parts):
            tables.extend(_group_tables(root, group, dirs))
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


def _groups(parts: list[int]) -> list[list[int]]:
    """The complete parts grouped by the rows file their number falls in."""
    out: dict[int, list[int]] = {}
    for n in parts:
        out.setdefault(n // PARTS_PER_FILE, []).append(n)
    return [out[g] for g in sorted(out)]


def group_name(group: int) -> str:
    """The rows file of part numbers group·PARTS_PER_FILE onwards."""
    return f"rows-group-{group:05d}.arrow"


def _group_tables(root: str, parts: list[int], dirs: list[str]) -> list[pa.Table]:
    """The parts' rows (one table each), memory-mapped from the first current rows file of
    their group; written when none is."""
    layout = S.CollectionLayout(root)
    signatures = []
    for n in parts:
        try:
            signatures.append(source_signature(layout.metadata(n)))
        except FileNotFoundError:
            raise CollectionError(f"{layout.metadata(n)}: missing metadata part") from None
    recorded = {"version": ROWS_VERSION, "parts": parts, "signatures": signatures}
    name = group_name(parts[0] // PARTS_PER_FILE)
    for d in dirs:
        path = os.path.join(d, name)
        if os.path.exists(path):
            try:
                tables, found = _open_ipc(path)
            except (OSError, pa.ArrowInvalid) as exc:
                log.warning("%s: unreadable rows file, rebuilding: %s", path, exc)
                continue
            if found == recorded:
                return tables
    for d in dirs:
        path = os.path.join(d, name)
        try:
            _write_ipc(root, path, parts, recorded)
        except OSError as exc:  # a read-only collection: the next place (the cache) will do
            log.info("%s: cannot write rows file (%s); trying the next place", path, exc)
            continue
        _remove_part_files(d, parts)
        return _open_ipc(path)[0]
    raise CollectionError(f"{root}: could not write the rows file {name} in any of {dirs}")


def _remove_part_files(folder: str, parts: list[int]) -> None:
    """Per-part rows files of an earlier version, replaced by their group's file."""
    for n in parts:
        old = os.path.join(folder, S.rows_name(n))
        if os.path.exists(old):
            os.remove(old)
