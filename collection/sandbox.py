"""Untrusted SQL, run in a separate worker process that the caller's process outlives.

DuckDB's own documentation says that SQL from people you do not trust needs an OS-level
sandbox on top of DuckDB's settings, so a `Sandbox` keeps one long-lived worker process
(a fresh interpreter started with subprocess) holding a DuckDB connection that is locked the documented way:
the data is registered first (Arrow datasets and tables, read by pyarrow, never by DuckDB's
file system), then `enable_external_access=false`, extension autoload/autoinstall off,
`memory_limit`, `threads`, `max_temp_directory_size`, and last `lock_configuration=true`.
The worker's address space is capped (RLIMIT_AS), each query gets a wall-clock limit
(interrupted inside the worker; if it does not stop, the parent kills the worker and starts
a new one), only one SELECT statement is accepted, results are capped in rows (with a
`truncated` flag) and in bytes. Every refusal is a `SqlError` with a one-line reason.

Used by `curation.catalog.Catalog(untrusted=True)` (the UI's query box) and by
`indices.search`'s `filters=` (a WHERE clause over the search candidates).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Mapping, Sequence

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from collection.procfs import process_status_kib

log = logging.getLogger(__name__)

#: how long a new worker may take to import, register its data and lock its connection
START_TIMEOUT_S = 120.0
#: bytes the result of one query may take in Arrow IPC form (rows are capped separately)
MAX_RESULT_BYTES = 64 * 2**20
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


class SqlError(ValueError):
    """A refused or failed SQL statement; the message is one line saying why."""


def parse_size(text: str) -> int:
    """Bytes in a DuckDB-style size ('1GB', '512MiB', '100 MB')."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(text).upper())
    if not m or m.group(2) not in _UNITS:
        raise ValueError(
            f"memory size {text!r}: expected a number and a unit such as 1GB or 512MiB"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2)])


@dataclass(frozen=True)
class Limits:
    """What one untrusted query may use."""

    timeout_s: float = 10.0
    memory_limit: str = "1GB"
    threads: int | None = None  # None: the cores this process may run on
    max_temp_directory_size: str = "0B"  # no spilling to disk
    #: RLIMIT_AS over what the worker maps after its imports; None: 2 x memory_limit + 1 GiB
    #: (DuckDB's limit covers its buffer manager, not pyarrow's scan buffers or thread stacks)
    address_space: int | None = None
    #: extra seconds the parent waits after timeout_s for the worker's interrupt to land
    grace_s: float = 5.0

    def worker_threads(self) -> int:
        return self.threads or max(1, len(os.sched_getaffinity(0)))

    def address_space_budget(self) -> int:
        return self.address_space or 2 * parse_size(self.memory_limit) + 2**30


@dataclass(frozen=True)
class Source:
    """A table the worker registers before it locks itself: parquet files scanned through a
    pyarrow dataset (optionally with rows filtered out at the scan: no query can see them) or
    an in-memory Arrow table; `select` is the projection the view `name` shows."""

    name: str
    files: tuple[str, ...] = ()
    schema: pa.Schema | None = None
    keep: pc.Expression | None = None
    select: str = "*"
    table: pa.Table | None = None


def one_line(exc: BaseException | str, limit: int = 400) -> str:
    """The first line of an error message, trimmed: what a SqlError carries."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _ipc(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(data).read_all()


# ---- the worker process -----------------------------------------------------------------
def _vm_size() -> int:
    """Bytes of address space this process maps now (Linux)."""
    kib = process_status_kib("VmSize")
    if kib is None:
        raise OSError("no VmSize in /proc/self/status")
    return kib * 1024


def _locked_connection(sources: Sequence[Source], limits: Limits) -> tuple[Any, list[Any]]:
    """A DuckDB connection with the sources registered, then locked; plus objects to keep alive."""
    threads = limits.worker_threads()
    pa.set_cpu_count(threads)
    pa.set_io_thread_count(max(2, threads))
    # pyarrow's default allocator (jemalloc) reserves address space far ahead of use, which an
    # RLIMIT_AS turns into spurious allocation failures; the system allocator maps what it uses
    pa.set_memory_pool(pa.system_memory_pool())
    con = duckdb.connect(":memory:")
    alive: list[Any] = []
    for src in sources:
        if src.table is not None:
            rel = con.from_arrow(src.table)
        else:
            data = pads.dataset(list(src.files), schema=src.schema, format="parquet")
            if src.keep is not None:
                data = data.filter(src.keep)
            rel = con.from_arrow(data)
        # a view over an anonymous Arrow scan: the data has no name of its own to query around `select`
        view = rel.project(src.select)
        view.create_view(src.name)
        alive += [rel, view]
    for statement in (
        "SET enable_progress_bar=false",  # it would draw on the caller's terminal
        "SET enable_external_access=false",
        "SET autoload_known_extensions=false",
        "SET autoinstall_known_extensions=false",
        f"SET memory_limit='{parse_size(limits.memory_limit)}B'",
        f"SET threads={threads}",
        f"SET max_temp_directory_size='{parse_size(limits.max_temp_directory_size)}B'",
        "SET lock_configuration=true",
    ):
        con.execute(statement)
    return con, alive


def _check_statement(sql: str) -> None:
    """One SELECT statement, or SqlError saying what it is instead."""
    if not isinstance(sql, str) or not sql.strip():
        raise SqlError("empty query")
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise SqlError(one_line(exc)) from None
    if len(statements) != 1:
        raise SqlError(f"one statement per query, got {len(statements)}")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise SqlError(f"only SELECT queries are allowed, got {kind.name}")


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
    reader = rel = None
    watchdog = None
    try:
        _check_statement(sql)
        for name, data in tables.items():
            if name in reserved:
                raise SqlError(f"table name {name!r} is taken")
            con.register(name, _from_ipc(data))
            registered.append(name)
        watchdog = _Watchdog(con, timeout_s)
        rel = con.sql(sql)
        if rel is None:
            raise SqlError("not a query")
        batches, rows, truncated = [], 0, False
        cap = None if row_cap is None else max(0, int(row_cap))
        reader = rel.to_arrow_reader(2048 if cap is None else max(1, min(cap + 1, 2048)))
        schema = reader.schema
        for batch in reader:
            if cap is not None and rows + batch.num_rows > cap:
                batches.append(batch.slice(0, cap - rows))
                truncated = True
                break
            batches.append(batch)
            rows += batch.num_rows
        data = _ipc(pa.Table.from_batches(batches, schema=schema))
        if len(data) > MAX_RESULT_BYTES:
            raise SqlError(
                f"result is {len(data) / 2**20:.0f} MiB, over the {MAX_RESULT_BYTES // 2**20} MiB limit; "
                "select fewer rows or columns"
            )
        return ("ok", data, truncated, time.perf_counter() - start)
    except SqlError as exc:
        return ("error", str(exc))
    except duckdb.InterruptException:
        return ("error", f"query ran past the {timeout_s:g} s time limit and was stopped")
    except (duckdb.OutOfMemoryException, MemoryError) as exc:
        return ("error", f"query ran out of memory: {one_line(exc)}")
    except (duckdb.Error, pa.ArrowException, ValueError, OverflowError, RuntimeError) as exc:
        if watchdog is not None and watchdog.fired:
            return ("error", f"query ran past the {timeout_s:g} s time limit and was stopped")
        return ("error", one_line(exc))
    finally:
        if watchdog is not None:
            watchdog.stop()
        if reader is not None:
            reader.close()
        del reader, rel
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
    else:
        conn.send_bytes(json.dumps({"status": message[0], "detail": message[1]}).encode())


def worker_main(fd: int) -> None:
    """The worker process (`python -c`, given its socket's fd): read its sources and limits,
    cap the address space, build the locked connection, answer queries until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal is for the parent to handle
    conn = Connection(fd)
    try:
        sources, limits = conn.recv()
    except (EOFError, OSError):
        return
    try:
        cap = _vm_size() + limits.address_space_budget()
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        con, alive = _locked_connection(sources, limits)
    except (duckdb.Error, pa.ArrowException, OSError, ValueError, MemoryError) as exc:
        _reply(conn, ("error", one_line(exc)))
        return
    _reply(conn, ("ready", os.getpid()))
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


# ---- the parent side --------------------------------------------------------------------
def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class Sandbox:
    """A long-lived worker process for untrusted SQL over `sources`; `query` never lets a
    query take the caller's process down, and a worker that died or hung is replaced."""

    def __init__(
        self, sources: Sequence[Source] = (), limits: Limits = Limits(), label: str = "sql"
    ) -> None:
        self.sources, self.limits, self.label = tuple(sources), limits, label
        self._lock = threading.Lock()
        self._proc: Any = None
        self._conn: Any = None
        self._ready = False
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _spawn(self) -> None:
        # a fresh interpreter rather than multiprocessing: no copy of the caller's threads or data,
        # and no re-import of the caller's main script (which a script without a __main__ guard
        # would run again)
        parent, child = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p or ".") for p in sys.path)
        env["MALLOC_ARENA_MAX"] = (
            "2"  # glibc's per-thread arenas reserve address space the cap counts
        )
        try:
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    f"from collection.sandbox import worker_main; worker_main({child.fileno()})",
                ],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        finally:
            child.close()
        self._conn, self._ready = Connection(parent.detach()), False
        self._conn.send((self.sources, self.limits))

    def _wait_ready(self) -> None:
        if self._proc is None:
            self._spawn()
        if self._ready:
            return
        try:
            if not self._conn.poll(START_TIMEOUT_S):
                raise SqlError(f"SQL worker did not start within {START_TIMEOUT_S:g} s")
            reply = self._receive()
        except (EOFError, OSError, ValueError):
            code = self._stop()
            raise SqlError(
                f"SQL worker failed to start ({_describe_exit(code)}; its stderr says why)"
            ) from None
        except SqlError:
            self._stop()
            raise
        if reply["status"] != "ready":
            self._stop()
            raise SqlError(f"SQL worker could not load its data: {reply['detail']}")
        self._ready = True

    def _stop(self) -> int | None:
        """Kill the worker (if any) and forget it; returns its exit code."""
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        self._ready = False
        if conn is not None:
            conn.close()
        if proc is None:
            return None
        if proc.poll() is None:
            proc.kill()
        try:
            return proc.wait(10)
        except subprocess.TimeoutExpired:
            return None

    def _replace(self) -> int | None:
        """Kill the worker and start its replacement (ready by the next query); its old exit code."""
        code = self._stop()
        self.restarts += 1
        try:
            self._spawn()
        except OSError as exc:  # the next query tries again
            log.warning("%s sandbox: could not start a new worker: %s", self.label, exc)
        return code

    def start(self) -> "Sandbox":
        """Start the worker now and wait until its data is registered (otherwise: on first query)."""
        with self._lock:
            self._wait_ready()
        return self

    def query(
        self, sql: str, row_cap: int | None = 10_000, tables: Mapping[str, pa.Table] | None = None
    ) -> tuple[pa.Table, bool, float]:
        """(result, truncated, seconds in the worker) of one SELECT; `tables` are registered for
        this query only. Raises SqlError for every refusal, limit or failure."""
        payload = {name: _ipc(t) for name, t in (tables or {}).items()}
        with self._lock:
            self._wait_ready()
            try:
                self._conn.send(("query", sql, row_cap, payload))
            except (BrokenPipeError, OSError) as exc:
                code = self._replace()
                raise SqlError(
                    f"SQL worker was gone ({_describe_exit(code)}: {exc}); restarted, try again"
                ) from None
            wait = self.limits.timeout_s + self.limits.grace_s
            try:
                answered = self._conn.poll(wait)
                reply = self._receive() if answered else None
            except (EOFError, OSError, ValueError):
                code = self._replace()
                raise SqlError(
                    f"query stopped: the SQL worker died ({_describe_exit(code)}); running out of "
                    f"memory under its {self.limits.memory_limit} limit is the usual cause; "
                    "a new worker was started"
                ) from None
            if reply is None:
                self._replace()
                raise SqlError(
                    f"query ran past the {self.limits.timeout_s:g} s time limit and did not stop; "
                    "its worker was killed and a new one started"
                )
        if reply["status"] != "ok":
            raise SqlError(str(reply.get("detail", reply["status"])))
        return reply["table"], bool(reply["truncated"]), float(reply["seconds"])

    def _receive(self) -> dict[str, Any]:
        """One reply from the worker (header, and a checked Arrow table for results); ValueError
        or EOFError when the worker sent something malformed or is gone."""
        header = json.loads(self._conn.recv_bytes(2**20))
        if not isinstance(header, dict) or "status" not in header:
            raise ValueError("malformed reply from the SQL worker")
        if header["status"] == "ok":
            try:
                table = _from_ipc(self._conn.recv_bytes(MAX_RESULT_BYTES + 2**20))
                table.validate(full=True)
            except pa.ArrowException as exc:
                raise ValueError(f"malformed result from the SQL worker: {exc}") from None
            header["table"] = table
        return header

    def close(self) -> None:
        """Stop the worker (a later query starts a new one)."""
        with self._lock:
            if self._conn is not None and self._ready:
                try:
                    self._conn.send(("close",))
                except (BrokenPipeError, OSError):
                    pass  # already gone: _stop reaps it
                if self._proc is not None:
                    try:
                        self._proc.wait(2)
                    except subprocess.TimeoutExpired:
                        pass  # _stop kills it
            self._stop()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._stop()
        except (
            OSError,
            ValueError,
            AttributeError,
            TypeError,
        ):  # interpreter shutdown: best effort only
            pass
