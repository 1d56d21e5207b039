"""The untrusted-SQL worker process: confined, locked, and alive after any legal query.

Started by `collection.sandbox.Sandbox` as a fresh interpreter that first enters its namespaces
(`collection.sandbox_os.enter_namespaces`), then imports this module and runs `worker_main`:
caps its address space, opens DuckDB with one thread and no async I/O threads (so the process is
still single-threaded), confines itself (`collection.sandbox_os.confine`), registers its sources
(Arrow datasets and tables, read by pyarrow, never by DuckDB's file system), locks the
connection the documented way and answers queries until told to stop.

Every result is an Arrow table the parent can validate: types Arrow would hold wrongly (UHUGEINT
past 2^127, TIME WITH TIME ZONE's offset, BIT, BIGNUM, VARIANT, GEOMETRY) come back as DuckDB's
text of them, and a column whose values Arrow rejects (TIME '24:00:00', a HUGEINT of 39 digits)
is computed again as text. Every failure, before or after the first streamed batch, is a
one-line error reply; the worker carries on.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, Mapping, Sequence

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.ipc  # noqa: F401  (loaded before the worker is confined, like every module it uses)

from collection.procfs import process_status_kib
from collection.sandbox import (
    MAX_RESULT_BYTES,
    Limits,
    Source,
    SqlError,
    from_ipc,
    ipc,
    one_line,
    parse_size,
)
from collection.sandbox_os import confine, runtime_dirs, threads_now

#: DuckDB type ids whose Arrow form is wrong or opaque: sent as DuckDB's text of the value
TEXT_TYPES = frozenset({"uhugeint", "time with time zone", "bit", "bignum", "variant", "geometry"})
#: rows per streamed batch (the cap on result bytes is checked batch by batch)
BATCH_ROWS = 2048
#: folders of public read-only data some conversions read (time zones)
_DATA_DIRS = ("/usr/share/zoneinfo",)


def _vm_size() -> int:
    """Bytes of address space this process maps now (Linux)."""
    kib = process_status_kib("VmSize")
    if kib is None:
        raise OSError("no VmSize in /proc/self/status")
    return kib * 1024


def _set_rlimits(limits: Limits) -> None:
    """Address space capped over what the imports mapped; no core files (they would hold data)."""
    cap = _vm_size() + limits.address_space_budget()
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _connect(limits: Limits, temp_dir: str) -> Any:
    """DuckDB with its temp folder set, one thread and no async I/O threads: the process stays
    single-threaded until it is confined (each OS layer binds threads started after it)."""
    return duckdb.connect(
        ":memory:",
        config={
            "threads": 1,
            "async_threads": 0,
            "memory_limit": f"{parse_size(limits.memory_limit)}B",
            "temp_directory": temp_dir,
            "max_temp_directory_size": f"{parse_size(limits.max_temp_directory_size)}B",
        },
    )


def _register_and_lock(con: Any, sources: Sequence[Source], limits: Limits) -> list[Any]:
    """Register the sources, then lock the connection; returns objects to keep alive."""
    threads = limits.worker_threads()
    pa.set_cpu_count(threads)
    pa.set_io_thread_count(max(2, threads))
    # pyarrow's default allocator (jemalloc) reserves address space far ahead of use, which an
    # RLIMIT_AS turns into spurious allocation failures; the system allocator maps what it uses
    pa.set_memory_pool(pa.system_memory_pool())
    alive: list[Any] = []
    for src in sources:
        if src.table is not None:
            rel = con.from_arrow(src.table)
        else:
            data = pads.dataset(list(src.files), schema=src.schema, format="parquet")
            if src.keep is not None:
                data = data.filter(src.keep)
            rel = con.from_arrow(data)
        # a view over an anonymous Arrow scan: the data has no name to query around `select`
        view = rel.project(src.select)
        view.create_view(src.name)
        alive += [rel, view]
    for statement in (
        "SET enable_progress_bar=false",  # it would draw on the caller's terminal
        "SET enable_external_access=false",
        "SET autoload_known_extensions=false",
        "SET autoinstall_known_extensions=false",
        f"SET threads={threads}",
        "SET lock_configuration=true",
    ):
        con.execute(statement)
    return alive


def _check_statement(con: Any, sql: str) -> None:
    """One SELECT statement, or SqlError saying what it is instead (parsed by `con`: the module's
    default connection would open a second database, unconfined by this one's settings)."""
    if not isinstance(sql, str) or not sql.strip():
        raise SqlError("empty query")
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise SqlError(one_line(exc)) from None
    if len(statements) != 1:
        raise SqlError(f"one statement per query, got {len(statements)}")
    try:
        kind = statements[0].type.name
    except ValueError:  # a statement type the Python API has no name for (UPDATE EXTENSIONS)
        kind = "a statement of another kind"
    if kind != duckdb.StatementType.SELECT.name:
        raise SqlError(f"only SELECT queries are allowed, got {kind}")


class _Watchdog:
    """Interrupts the connection's running query after `seconds`, never a later one."""

    def __init__(self, con: Any, seconds: float) -> None:
        self.con, self.lock, self.running, self.fired = con, threading.Lock(), True, False
        self.timer = threading.Timer(seconds, self._fire)
        self.timer.daemon = True
        self.timer.start()

    def _fire(self) -> None:
        with self.lock:
            if self.running:
                self.fired = True
                self.con.interrupt()

    def stop(self) -> None:
        with self.lock:
            self.running = False
        self.timer.cancel()


def _needs_text(kind: Any) -> bool:
    """Whether a DuckDB type, or any type nested in it, is one Arrow would hold wrongly."""
    if kind.id in TEXT_TYPES:
        return True
    try:
        children = kind.children
    except (duckdb.InvalidInputException, AttributeError, TypeError):
        return False  # not a nested type
    return any(_needs_text(t) for _, t in children if hasattr(t, "id"))  # not sizes or labels


def _as_text(rel: Any, columns: set[int]) -> Any:
    """The relation with the given columns (0-based) cast to VARCHAR, by position (a result may
    repeat a column name)."""
    names = rel.columns
    exprs = []
    for i, name in enumerate(names):
        quoted = '"' + name.replace('"', '""') + '"'
        ref = f"#{i + 1}"
        exprs.append(
            f"CAST({ref} AS VARCHAR) AS {quoted}" if i in columns else f"{ref} AS {quoted}"
        )
    return rel.project(", ".join(exprs))


def _invalid_columns(table: pa.Table) -> dict[int, str]:
    """Columns whose values Arrow rejects (out-of-range times, decimals past their precision)."""
    bad = {}
    for i, column in enumerate(table.columns):
        try:
            column.validate(full=True)
        except pa.ArrowException as exc:
            bad[i] = one_line(exc)
    return bad


def _stream(rel: Any, cap: int | None) -> tuple[pa.Table, bool]:
    """At most `cap` rows of a relation (the rest is never computed) within MAX_RESULT_BYTES."""
    reader = rel.to_arrow_reader(BATCH_ROWS if cap is None else max(1, min(cap + 1, BATCH_ROWS)))
    try:
        schema, batches, rows, size, truncated = reader.schema, [], 0, 0, False
        for batch in reader:
            if cap is not None and rows + batch.num_rows > cap:
                batch, truncated = batch.slice(0, cap - rows), True
            size += batch.get_total_buffer_size()
            if size > MAX_RESULT_BYTES:
                raise SqlError(
                    f"result is over the {MAX_RESULT_BYTES // 2**20} MiB limit; "
                    "select fewer rows or columns"
                )
            batches.append(batch)
            rows += batch.num_rows
            if truncated:
                break
        return pa.Table.from_batches(batches, schema=schema), truncated
    finally:
        reader.close()


def _result(con: Any, sql: str, cap: int | None) -> tuple[pa.Table, bool]:
    """The query's rows as an Arrow table the parent's full validation accepts."""
    rel = con.sql(sql)
    if rel is None:
        raise SqlError("not a query")
    text = {i for i, kind in enumerate(rel.types) if _needs_text(kind)}
    table, truncated = _stream(_as_text(rel, text) if text else rel, cap)
    bad = _invalid_columns(table)
    if bad:  # computed again, the same rows, with those columns as DuckDB's text
        table, truncated = _stream(_as_text(con.sql(sql), text | set(bad)), cap)
        still = _invalid_columns(table)
        if still:
            i, why = next(iter(still.items()))
            raise SqlError(f"column {table.column_names[i]!r} cannot be sent: {why}")
    return table, truncated


def _run(
    con: Any,
    sql: str,
    row_cap: int | None,
    tables: Mapping[str, bytes],
    timeout_s: float,
    reserved: set[str],
) -> tuple:
    """One query in the worker: ("ok", ipc bytes, truncated, seconds) or ("error", reason)."""
    start = time.perf_counter()
    registered: list[str] = []
    watchdog = None
    stopped = f"query ran past the {timeout_s:g} s time limit and was stopped"
    try:
        _check_statement(con, sql)
        for name, data in tables.items():
            if name in reserved:
                raise SqlError(f"table name {name!r} is taken")
            con.register(name, from_ipc(data))
            registered.append(name)
        watchdog = _Watchdog(con, timeout_s)
        cap = None if row_cap is None else max(0, int(row_cap))
        table, truncated = _result(con, sql, cap)
        data = ipc(table)
        if len(data) > MAX_RESULT_BYTES:
            raise SqlError(
                f"result is {len(data) / 2**20:.0f} MiB, over the "
                f"{MAX_RESULT_BYTES // 2**20} MiB limit; select fewer rows or columns"
            )
        return ("ok", data, truncated, time.perf_counter() - start)
    except SqlError as exc:
        return ("error", str(exc))
    except duckdb.InterruptException:
        return ("error", stopped)
    except (duckdb.OutOfMemoryException, MemoryError) as exc:
        return ("error", f"query ran out of memory: {one_line(exc)}")
    except Exception as exc:  # whatever else fails, mid-stream too, is the query's: one line
        if watchdog is not None and watchdog.fired:
            return ("error", stopped)
        if "out of memory" in str(exc).lower():
            return ("error", f"query ran out of memory: {one_line(exc)}")
        return ("error", one_line(exc))
    finally:
        if watchdog is not None:
            watchdog.stop()
        for name in registered:
            con.unregister(name)


def _reply(conn: Any, message: tuple) -> None:
    """Worker → parent: a JSON header, then for results the Arrow IPC bytes. Never a pickle: the
    parent must not run code a compromised worker chose."""
    if message[0] == "ok":
        _, data, truncated, seconds = message
        conn.send_bytes(
            json.dumps({"status": "ok", "truncated": truncated, "seconds": seconds}).encode()
        )
        conn.send_bytes(data)
    elif message[0] == "ready":
        _, pid, layers = message
        conn.send_bytes(json.dumps({"status": "ready", "pid": pid, "layers": layers}).encode())
    else:
        conn.send_bytes(json.dumps({"status": message[0], "detail": message[1]}).encode())


def _start(
    sources: Sequence[Source], limits: Limits, workdir: str, layers: dict[str, Any]
) -> tuple[Any, list[Any]]:
    """Cap, connect, confine, register, lock and warm up: the worker ready for queries."""
    temp_dir = os.path.join(workdir, "tmp")
    _set_rlimits(limits)
    con = _connect(limits, temp_dir)
    # the folders holding the data: the file a path names today may be replaced atomically later
    folders = sorted({os.path.dirname(os.path.realpath(f)) for s in sources for f in s.files})
    data_dirs = [d for d in _DATA_DIRS if os.path.isdir(d)]
    if threads_now() != 1:  # confine() reports the layers as partial
        layers["threads_before_confine"] = threads_now()
    layers.update(confine(folders, runtime_dirs() + data_dirs, [temp_dir]))
    alive = _register_and_lock(con, sources, limits)
    # the first query loads what DuckDB and pyarrow load lazily, before a user's query could fail
    warm = _run(con, "SELECT 1 AS one", 1, {}, limits.timeout_s, set())
    if warm[0] != "ok":
        raise SqlError(f"the worker cannot answer SELECT 1: {warm[1]}")
    return con, alive


def worker_main(fd: int, layers: dict[str, Any]) -> None:
    """The worker process (`python -c`, given its socket's fd and the namespace layers it
    entered): read its sources, limits and folder, start, answer queries until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal is for the parent
    conn = Connection(fd)
    try:
        sources, limits, workdir = conn.recv()  # a pickle from the parent, which trusts itself
    except (EOFError, OSError):
        return
    layers = dict(layers)
    try:
        con, alive = _start(sources, limits, workdir, layers)
    except (duckdb.Error, pa.ArrowException, OSError, ValueError, MemoryError) as exc:
        _reply(conn, ("error", one_line(exc)))
        return
    _reply(conn, ("ready", os.getpid(), layers))
    reserved = {s.name for s in sources}
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] == "close":
            return
        _, sql, row_cap, tables = msg
        _reply(conn, _run(con, sql, row_cap, tables, limits.timeout_s, reserved))
