"""Untrusted SQL, run in confined worker processes that the caller's process outlives.

DuckDB's own documentation says that SQL from people you do not trust needs an OS-level
sandbox on top of DuckDB's settings. A `Sandbox` keeps one long-lived worker process (a fresh
interpreter, `collection.sandbox_worker`) in an empty working directory, inside its own user
and network namespaces, under Landlock, seccomp and `no_new_privs` with every capability
dropped (`collection.sandbox_os`; `sandbox_layers()` says which layers this kernel allows),
holding a DuckDB connection locked the documented way: data registered first (Arrow datasets
read by pyarrow, never by DuckDB's file system), then external access and extension loading
off, `memory_limit`, bounded `threads`, `temp_directory` in its own folder, and last
`lock_configuration=true`. Its address space is capped (RLIMIT_AS), each query gets a
wall-clock limit (interrupted inside the worker; if it does not stop, the parent kills the
worker and starts a new one, with a growing pause when workers keep failing), only one SELECT
is accepted, results are capped in rows (with a `truncated` flag) and bytes. Every refusal is
a `SqlError` with a one-line reason.

`collection.sandbox_pool.SandboxPool` shares a few such workers fairly among clients.

Used by `curation.catalog.Catalog(untrusted=True)` (the UI's query box) and by
`indices.search`'s `filters=` (a WHERE clause over the search candidates).
"""

from __future__ import annotations

import atexit
import dataclasses
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc

log = logging.getLogger(__name__)

#: how long a new worker may take to import, register its data and lock its connection
START_TIMEOUT_S = 120.0
#: bytes the result of one query may take in Arrow (rows are capped separately)
MAX_RESULT_BYTES = 64 * 2**20
#: DuckDB threads per worker when Limits.threads is not set: the others' queries keep cores
MAX_THREADS_PER_WORKER = 2
#: pause before restarting a worker that failed twice in a row, doubled per further failure
BACKOFF_S, MAX_BACKOFF_S = 0.5, 30.0
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
#: what the worker process runs: its namespaces first, while it has one thread, then the rest
_WORKER = (
    "from collection.sandbox_os import enter_namespaces; layers = enter_namespaces(); "
    "from collection.sandbox_worker import worker_main; worker_main({fd}, layers)"
)
#: environment of the worker: no thread may start before it is confined (jemalloc's background
#: thread, BLAS pools), glibc's per-thread arenas would reserve address space the cap counts
_WORKER_ENV = {
    "JE_ARROW_MALLOC_CONF": "background_thread:false",
    "ARROW_DEFAULT_MEMORY_POOL": "system",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MALLOC_ARENA_MAX": "2",
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
    threads: int | None = None  # None: the cores this process may run on, at most 2
    max_temp_directory_size: str = "0B"  # no spilling to disk
    #: RLIMIT_AS over what the worker maps after its imports; None: 2 x memory_limit + 1 GiB
    #: (DuckDB's limit covers its buffer manager, not pyarrow's scan buffers or thread stacks)
    address_space: int | None = None
    #: extra seconds the parent waits after timeout_s for the worker's interrupt to land
    grace_s: float = 5.0

    def worker_threads(self) -> int:
        """DuckDB's and pyarrow's threads in the worker: bounded, so one query leaves cores over."""
        cores = len(os.sched_getaffinity(0))
        return self.threads or max(1, min(MAX_THREADS_PER_WORKER, cores))

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


def ipc(table: pa.Table) -> bytes:
    """A table as Arrow IPC stream bytes: what goes between the worker and its parent."""
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def from_ipc(data: bytes) -> pa.Table:
    """The table in Arrow IPC stream bytes."""
    return pa.ipc.open_stream(data).read_all()


# ---- the parent side --------------------------------------------------------------------
_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()
#: every sandbox with a worker, stopped at exit: a caller that never closed one (a cached UI
#: resource, say) leaves no worker folder behind
_live: "weakref.WeakSet[Sandbox]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for box in list(_live):
        box._stop()


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _died(code: int | None) -> str:
    """What a caller is told when the worker died under its query."""
    hint = ""
    if code is not None and -code in (signal.SIGKILL, signal.SIGABRT):
        hint = "; memory exhaustion is a common cause"
    return f"query stopped: the SQL worker died ({_describe_exit(code)}){hint}; a new one starts"


def _absolute(path: str) -> str:
    """A local path made absolute against this process's working directory; URLs unchanged."""
    return path if "://" in path else os.path.abspath(path)


def _warn_missing(label: str, layers: Mapping[str, Any]) -> None:
    """Log each OS layer a worker runs without, once per process and reason."""
    for name, entry in layers.items():
        if isinstance(entry, dict) and not entry.get("in_force"):
            key = (name, str(entry.get("detail")))
            with _warned_lock:
                if key in _warned:
                    continue
                _warned.add(key)
            log.warning("%s sandbox: layer %s is %s", label, name, entry.get("detail"))


class Sandbox:
    """A long-lived worker process for untrusted SQL over `sources`; `query` never lets a
    query take the caller's process down, and a worker that died or hung is replaced."""

    def __init__(
        self, sources: Sequence[Source] = (), limits: Limits = Limits(), label: str = "sql"
    ) -> None:
        # the worker runs in a folder of its own: relative paths are the caller's
        self.sources = tuple(
            dataclasses.replace(s, files=tuple(_absolute(f) for f in s.files)) for s in sources
        )
        self.limits, self.label = limits, label
        self._lock = threading.Lock()
        self._proc: Any = None
        self._conn: Any = None
        self._workdir: str | None = None
        self._ready = False
        self.restarts = 0
        self._failures = 0  # in a row: the restart backoff grows with them
        self._not_before = 0.0
        #: the OS layers the current worker reported (sandbox_os.LAYERS), once it is ready
        self.layers: dict[str, Any] = {}

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def available_at(self) -> float:
        """The monotonic time this sandbox can next run a query (0: a worker is up or starting)."""
        return 0.0 if self._proc is not None else self._not_before

    def _spawn(self) -> None:
        # a fresh interpreter rather than multiprocessing: no copy of the caller's threads or data,
        # and no re-import of the caller's main script (which a script without a __main__ guard
        # would run again); its working directory is a new empty folder
        parent, child = socket.socketpair()
        workdir = tempfile.mkdtemp(prefix=f"sieve-{self.label}-")
        os.mkdir(os.path.join(workdir, "tmp"), 0o700)
        env = {**os.environ, **_WORKER_ENV, "HOME": workdir, "TMPDIR": f"{workdir}/tmp"}
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p or ".") for p in sys.path)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER.format(fd=child.fileno())],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                cwd=workdir,
                env=env,
            )
        except OSError:
            shutil.rmtree(workdir, ignore_errors=True)
            parent.close()
            raise
        finally:
            child.close()
        self._workdir = workdir
        _live.add(self)
        self._conn, self._ready = Connection(parent.detach()), False
        self._conn.send((self.sources, self.limits, workdir))

    def spawn(self) -> None:
        """Start the worker process without waiting for it (no-op when one is up or in backoff)."""
        with self._lock:
            if self._proc is None and time.monotonic() >= self._not_before:
                self._spawn()

    def _failed(self) -> float:
        """Count a failure in a row; the pause before the next start."""
        self._failures += 1
        delay = 0.0
        if self._failures > 1:
            delay = min(MAX_BACKOFF_S, BACKOFF_S * 2 ** (self._failures - 2))
            log.warning(
                "%s sandbox: worker failed %d times in a row; next start in %.1f s",
                self.label,
                self._failures,
                delay,
            )
        self._not_before = time.monotonic() + delay
        return delay

    def _wait_ready(self) -> None:
        if self._proc is None:
            time.sleep(max(0.0, self._not_before - time.monotonic()))
            self._spawn()
        if self._ready:
            return
        try:
            if not self._conn.poll(START_TIMEOUT_S):
                raise SqlError(f"SQL worker did not start within {START_TIMEOUT_S:g} s")
            reply = self._receive()
        except (EOFError, OSError, ValueError):
            code = self._stop()
            self._failed()
            raise SqlError(
                f"SQL worker failed to start ({_describe_exit(code)}; its stderr says why)"
            ) from None
        except SqlError:
            self._stop()
            self._failed()
            raise
        if reply["status"] != "ready":
            self._stop()
            self._failed()
            raise SqlError(f"SQL worker could not load its data: {reply.get('detail')}")
        self.layers = dict(reply.get("layers") or {})
        _warn_missing(self.label, self.layers)
        self._ready = True

    def _stop(self) -> int | None:
        """Kill the worker (if any), remove its folder and forget it; returns its exit code."""
        proc, conn, workdir = self._proc, self._conn, self._workdir
        self._proc = self._conn = self._workdir = None
        self._ready = False
        if conn is not None:
            conn.close()
        code = None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            try:
                code = proc.wait(10)
            except subprocess.TimeoutExpired:
                code = None
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        return code

    def _replace(self) -> int | None:
        """Kill the worker and start its replacement (at once, or after the backoff when
        workers keep failing); returns the old one's exit code."""
        code = self._stop()
        self.restarts += 1
        if self._failed() == 0:
            try:
                self._spawn()
            except OSError as exc:  # the next query tries again
                log.warning("%s sandbox: could not start a new worker: %s", self.label, exc)
        return code

    def start(self) -> "Sandbox":
        """Start the worker now and wait until its data is registered (else: at the first query)."""
        with self._lock:
            self._wait_ready()
        return self

    def query(
        self, sql: str, row_cap: int | None = 10_000, tables: Mapping[str, pa.Table] | None = None
    ) -> tuple[pa.Table, bool, float]:
        """(result, truncated, seconds in the worker) of one SELECT; `tables` are registered for
        this query only. Raises SqlError for every refusal, limit or failure."""
        payload = {name: ipc(t) for name, t in (tables or {}).items()}
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
            except (EOFError, OSError):
                raise SqlError(_died(self._replace())) from None
            except ValueError as exc:  # framing intact, content not: a worker not to trust
                self._replace()
                raise SqlError(f"{one_line(exc)}; a new SQL worker starts") from None
            if reply is None:
                self._replace()
                raise SqlError(
                    f"query ran past the {self.limits.timeout_s:g} s time limit and did not stop; "
                    "its worker was killed and a new one started"
                )
            self._failures = 0
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
            data = self._conn.recv_bytes(MAX_RESULT_BYTES + 2**20)
            try:
                table = from_ipc(data)
                table.validate(full=True)
            except pa.ArrowException as exc:
                raise ValueError(
                    f"the SQL worker sent a result that does not validate: {one_line(exc)}"
                ) from None
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
        except (OSError, ValueError, AttributeError, TypeError):  # interpreter shutdown
            pass


def sandbox_layers(label: str = "check") -> dict[str, Any]:
    """The OS layers a worker runs under on this machine: starts one, asks, stops it."""
    with Sandbox(label=label) as box:
        box.start()
        return dict(box.layers)
