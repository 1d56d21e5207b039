"""SQL over a collection's metadata: `Catalog(collection).query("SELECT ... FROM samples")`.

Table `samples` is every complete metadata part (all `collection.schema` columns plus the
source's own columns) and `id`, the global vector id (position among the ok rows of all
complete parts in part order, as the indices number them; NULL for failed rows).

- Trusted (the owner's own queries, `python -m curation.sql`): an in-process DuckDB
  connection over the Parquet parts with DuckDB's own reader; no limits, no row cap unless
  `query(..., row_cap=N)` asks for one.
- Untrusted (`untrusted=True`, what the UI's query box runs): `collection.sandbox_pool` — a
  few confined worker processes (OS sandbox and locked DuckDB connection: `collection.sandbox`)
  shared fairly among clients (`query(..., client=SESSION)`), one SELECT, time / memory / row
  caps, every refusal a `SqlError`. Taken-down rows are filtered out at the scan, so no query
  can see them; a changed takedown list starts new workers for the queries after the change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from pyarrow.fs import FSSpecHandler, PyFileSystem

from collection import schema as S, storage
from collection.parts import CollectionError, complete_parts, unify_part_schemas
from collection.sandbox import Limits, Source, SqlError, one_line
from collection.sandbox_pool import POOL_WORKERS, PoolClosed, SandboxPool
from collection.storage import read_collection_json
from collection.takedown import TakedownWatch
from models.cache import cache_dir

__all__ = ["Catalog", "CollectionError", "SqlError", "SqlResult", "TABLE"]

#: the table every query reads
TABLE = "samples"
#: the registered pyarrow dataset `samples` selects from, for a remote collection
_PARTS_VIEW = "_sieve_parts"
#: the folder under $SIEVE_CACHE holding local stand-ins of remote collections (the sandbox's
#: copies of their metadata parts), one folder per collection URL
MIRROR_DIR = "collections"

log = logging.getLogger(__name__)


@dataclass
class SqlResult:
    """A query's rows, whether the row cap cut them short, and the seconds it took."""

    table: pa.Table
    truncated: bool
    seconds: float


@dataclass(frozen=True)
class Parts:
    """What the `samples` table is made of: files in part order (local paths or URLs), their
    unified schema, and the SQL expression that computes `id` from `part` and `emb_row`."""

    files: tuple[str, ...]
    schema: pa.Schema
    id_expr: str
    ok_rows: int

    def select(self) -> str:
        """The projection adding `id` (replacing a source column of that name in older
        collections), and `caption_length` where the parts predate it (measured here, so
        filters read one column)."""
        length = (
            ""
            if S.CAPTION_LENGTH in self.schema.names
            else f", length({S.CAPTION}) AS {S.CAPTION_LENGTH}"
        )
        if S.ID in self.schema.names:
            return f"* REPLACE ({self.id_expr} AS {S.ID}){length}"
        return f"*, {self.id_expr} AS {S.ID}{length}"


def _ok_rows(url: str, meta: Any) -> int:
    """Rows of a part with an embedding: from the footer's null counts of `emb_row` when written."""
    names = meta.schema.to_arrow_schema().names
    if S.EMB_ROW not in names:
        raise CollectionError(f"{url}: no {S.EMB_ROW!r} column")
    j = meta.schema.to_arrow_schema().get_field_index(S.EMB_ROW)
    nulls = 0
    for g in range(meta.num_row_groups):
        stats = meta.row_group(g).column(j).statistics
        if stats is None or not stats.has_null_count:
            fs, path = storage.url_to_fs(url)
            column = pq.read_table(path, columns=[S.EMB_ROW], filesystem=fs).column(0)
            return int(column.is_valid().to_numpy(zero_copy_only=False).sum())
        nulls += stats.null_count
    return meta.num_rows - nulls


def _check_part_column(url: str, n: int, meta: Any) -> None:
    """`id` is computed from the `part` column: it must hold N in metadata_N (footer statistics)."""
    schema = meta.schema.to_arrow_schema()
    if S.PART not in schema.names:
        raise CollectionError(f"{url}: no {S.PART!r} column")
    j = schema.get_field_index(S.PART)
    for g in range(meta.num_row_groups):
        stats = meta.row_group(g).column(j).statistics
        if stats is not None and stats.has_min_max and (stats.min != n or stats.max != n):
            raise CollectionError(
                f"{url}: column {S.PART!r} holds {stats.min}..{stats.max}, expected {n}"
            )


def _footer(url: str, n: int) -> Any:
    """Part n's Parquet footer, on a local path or any fsspec URL (one line naming it if not)."""
    fs, path = storage.url_to_fs(url)
    try:
        return pq.read_metadata(path, filesystem=fs)
    except FileNotFoundError:
        raise CollectionError(f"{url}: missing metadata of part {n}") from None
    except storage.REMOTE_ERRORS as exc:
        raise CollectionError(f"{url}: unreadable metadata part: {one_line(exc)}") from None


def read_parts(collection: str) -> Parts:
    """The complete parts' files, unified schema and `id` expression (footers only, no rows)."""
    layout = S.CollectionLayout(collection)
    parts = complete_parts(collection)
    local = storage.is_local(collection)
    files, schemas, offsets = [], [], {}
    total = 0
    for n in parts:
        url = layout.metadata(n)
        meta = _footer(url, n)
        _check_part_column(url, n, meta)
        offsets[n] = total
        total += _ok_rows(url, meta)
        files.append(storage.url_to_fs(url)[1] if local else url)  # DuckDB reads plain local paths
        schemas.append(meta.schema.to_arrow_schema())
    schema = unify_part_schemas(schemas, collection)
    listed = ", ".join(str(offsets[n]) if n in offsets else "NULL" for n in range(max(parts) + 1))
    id_expr = f"CAST(([{listed}]::BIGINT[])[{S.PART} + 1] + {S.EMB_ROW} AS BIGINT)"
    return Parts(tuple(files), schema, id_expr, total)


def mirror_parts(collection: str, files: Sequence[str]) -> tuple[str, ...]:
    """Local copies of a remote collection's metadata parts, for the sandboxed worker (which
    reads local folders only and has no network): in the collection's cache folder under
    $SIEVE_CACHE (`collections/<hash of the URL>/metadata/`), one file per version of a part
    named by its `file_signature`, so an unchanged part is copied once and a rewritten one
    anew. Older copies stay: a worker started before the rewrite may still be reading them."""
    where = hashlib.sha1(collection.encode()).hexdigest()[:16]
    folder = cache_dir() / MIRROR_DIR / where / S.METADATA_DIR
    out = []
    for url in files:
        try:
            signature = storage.file_signature(url)
        except storage.REMOTE_ERRORS as exc:
            raise CollectionError(f"{url}: cannot read metadata part: {one_line(exc)}") from None
        if signature is None:
            raise CollectionError(f"{url}: missing metadata part")
        stem = posixpath.splitext(posixpath.basename(storage.url_to_fs(url)[1]))[0]
        digest = hashlib.sha1(json.dumps(list(signature)).encode()).hexdigest()[:16]
        local = folder / f"{stem}.{digest}.parquet"
        if not local.exists():
            _copy(url, local, signature)
        out.append(str(local))
    return tuple(out)


def _copy(url: str, local: Path, signature: tuple) -> None:
    """Copy `url` to `local` atomically; a CollectionError naming it when it cannot be read or
    changed meanwhile (the copy would then be of neither version)."""
    fs, path = storage.url_to_fs(url)
    try:
        with storage.atomic_path(local) as tmp:
            fs.get_file(path, tmp)
            if storage.file_signature(url) != signature:
                raise CollectionError(f"{url}: rewritten while being copied; try again")
    except CollectionError:
        raise
    except storage.REMOTE_ERRORS as exc:
        raise CollectionError(f"{url}: cannot copy for the SQL sandbox: {one_line(exc)}") from None
    log.info("%s: copied for the SQL sandbox to %s", url, local)


def _scan(con: Any, collection: str, parts: Parts) -> str:
    """The FROM clause over the parts: DuckDB's own Parquet reader for a local collection;
    for a remote one a pyarrow dataset on the fsspec filesystem, registered with `con` (no
    DuckDB extension to download). Chosen over `duckdb.register_filesystem`, which also
    works but answered several times slower on the loopback S3 server:
    bench/results/sql_remote.json, `register_filesystem_vs_dataset`."""
    if storage.is_local(collection):
        files = ", ".join("'" + f.replace("'", "''") + "'" for f in parts.files)
        return f"read_parquet([{files}], union_by_name=true)"
    fs, _ = storage.url_to_fs(collection)
    dataset = pads.dataset(
        [storage.url_to_fs(f)[1] for f in parts.files],
        schema=parts.schema,
        format="parquet",
        filesystem=PyFileSystem(FSSpecHandler(fs)),
    )
    con.register(_PARTS_VIEW, dataset)
    return _PARTS_VIEW


class Catalog:
    """A DuckDB connection (trusted, in-process) or a sandboxed worker (untrusted) whose table
    `samples` holds the collection's metadata plus `id`. A collection in a bucket (any fsspec
    URL) works the same: trusted queries scan its parts through a pyarrow dataset (`_scan`),
    the sandbox reads local copies of them (`mirror_parts`)."""

    def __init__(
        self,
        collection: str,
        untrusted: bool = False,
        row_cap: int = 10_000,
        timeout_s: float = 10.0,
        memory_limit: str = "1GB",
        workers: int = POOL_WORKERS,
    ) -> None:
        self.root = collection
        self.untrusted = untrusted
        self.row_cap = row_cap
        self.limits = Limits(timeout_s=timeout_s, memory_limit=memory_limit)
        self.parts = read_parts(collection)  # first: names the URL when it cannot be read at all
        self.info = read_collection_json(collection)
        self._lock = threading.Lock()
        self._con: Any = None
        self.workers = workers
        self._sandbox: SandboxPool | None = None
        self._watch: TakedownWatch | None = None
        if untrusted:
            if not storage.is_local(collection):  # the sandbox's worker reads local files only
                self.parts = replace(self.parts, files=mirror_parts(collection, self.parts.files))
            self._watch = TakedownWatch(collection)
            self._sandbox = self._pool()
        else:
            self._con = duckdb.connect(":memory:")
            self._con.execute(
                "SET enable_progress_bar=false"
            )  # results may go to stdout (python -m curation.sql)
            self._con.execute(
                f"CREATE VIEW {TABLE} AS SELECT {self.parts.select()} "
                f"FROM {_scan(self._con, collection, self.parts)}"
            )

    def _pool(self) -> SandboxPool:
        """Workers whose scan drops what the current takedown list names."""
        assert self._watch is not None
        keep = self._watch.takedown.arrow_filter(self.parts.schema.names)
        source = Source(TABLE, self.parts.files, self.parts.schema, keep, self.parts.select())
        return SandboxPool([source], self.limits, "catalog", self.workers)

    @property
    def columns(self) -> list[str]:
        """Column names of `samples`, `id` included."""
        names = list(self.parts.schema.names)
        return names if S.ID in names else names + [S.ID]

    @property
    def clip_model(self) -> str:
        """The collection's CLIP spec (collection.json; sieve-tiny, the embed default, if none)."""
        return self.info.get("clip_model", "sieve-tiny")

    @property
    def connection(self) -> Any:
        """The trusted DuckDB connection (for callers that build relations themselves)."""
        if self._con is None:
            raise SqlError("an untrusted catalog has no in-process connection")
        return self._con

    @property
    def worker_pid(self) -> int | None:
        """Untrusted: the first sandbox worker's process id (None before it starts or when
        trusted); the one an idle catalog's next query runs on."""
        return self._sandbox.pid if self._sandbox is not None else None

    @property
    def sandbox(self) -> SandboxPool | None:
        """Untrusted: the current worker pool (for checks and figures); None when trusted."""
        return self._sandbox

    @property
    def sandbox_layers(self) -> dict[str, Any]:
        """Untrusted: the OS layers its workers run under (`collection.sandbox_os.LAYERS`), each
        {"in_force": bool, "detail": str}; empty before they start or when trusted."""
        return dict(self._sandbox.layers) if self._sandbox is not None else {}

    def start(self) -> "Catalog":
        """Untrusted: start the workers now instead of at the first query."""
        if self._sandbox is not None:
            self._sandbox.start()
        return self

    def query(self, sql: str, row_cap: int | None = None, client: str | None = None) -> SqlResult:
        """Run `sql`. Untrusted: one SELECT, capped at min(row_cap, the catalog's row_cap) rows,
        queued fairly per `client` (a session id; default: the calling thread). Trusted: every
        row unless row_cap is given. Failures raise SqlError."""
        if self._sandbox is not None:
            return self._query_untrusted(sql, row_cap, client)
        start = time.perf_counter()
        with self._lock:
            try:
                rel = self._con.sql(sql)
                if (
                    rel is None
                ):  # a statement without rows (CREATE, SET, ...): the owner may run those
                    return SqlResult(pa.table({}), False, time.perf_counter() - start)
                if row_cap is None:
                    table, truncated = rel.to_arrow_table(), False
                else:
                    table, truncated = _capped(rel, row_cap)
            except duckdb.Error as exc:
                raise SqlError(one_line(exc)) from None
        return SqlResult(table, truncated, time.perf_counter() - start)

    def _current_pool(self) -> SandboxPool:
        """The pool for a query starting now: a new one when the takedown list changed (a
        worker's scan filter is fixed at its start); the old one closes after its running
        queries, in the background, and its waiting ones move to the new pool."""
        assert self._watch is not None
        with self._lock:
            _, changed = self._watch.poll()
            if changed:
                old, self._sandbox = self._sandbox, self._pool()
                if old is not None:
                    threading.Thread(target=old.close, name="catalog-retire", daemon=True).start()
            assert self._sandbox is not None
            return self._sandbox

    def _query_untrusted(self, sql: str, row_cap: int | None, client: str | None) -> SqlResult:
        cap = self.row_cap if row_cap is None else min(row_cap, self.row_cap)
        start = time.perf_counter()
        pool = self._current_pool()
        try:
            table, truncated, _ = pool.query(sql, cap, client=client)
        except PoolClosed:
            if self._sandbox is pool or self._sandbox is None:  # the catalog itself was closed
                raise
            table, truncated, _ = self._sandbox.query(sql, cap, client=client)
        return SqlResult(table, truncated, time.perf_counter() - start)

    def joined(self, want: pa.Table, sql: str) -> pa.Table:
        """Trusted: `sql` run with the Arrow table `want` registered as `_want`, so a lookup of a
        few keys or ids is a join in DuckDB, never a Python dict over every row; SqlError."""
        con = self.connection
        with self._lock:
            con.register("_want", want)
            try:
                return con.sql(sql).to_arrow_table()
            except duckdb.Error as exc:
                raise SqlError(one_line(exc)) from None
            finally:
                con.unregister("_want")

    def count(self, where: str = "TRUE") -> int:
        """Rows of `samples` satisfying a WHERE clause."""
        return int(
            self.query(f"SELECT count(*) AS n FROM {TABLE} WHERE {where}")
            .table.column(0)[0]
            .as_py()
        )

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None
        if self._sandbox is not None:
            self._sandbox.close()

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _capped(rel: Any, row_cap: int) -> tuple[pa.Table, bool]:
    """At most row_cap rows of a relation, streamed (the rest is never computed), and whether
    it had more."""
    reader = rel.to_arrow_reader(max(1, min(row_cap + 1, 65536)))
    try:
        batches, rows = [], 0
        for batch in reader:
            if rows + batch.num_rows > row_cap:
                batches.append(batch.slice(0, row_cap - rows))
                return pa.Table.from_batches(batches, schema=reader.schema), True
            batches.append(batch)
            rows += batch.num_rows
        return pa.Table.from_batches(batches, schema=reader.schema), False
    finally:
        reader.close()
