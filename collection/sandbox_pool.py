"""A few SQL sandboxes shared fairly among the clients (sessions) of one process.

Each client's queries wait in their own queue, clients are served in turn, and no client runs
on more than all workers but one: one user's hostile query, which may hold its worker until
the time limit, never stalls another user's. `curation.catalog.Catalog(untrusted=True)` runs
every query through one.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import pyarrow as pa

from collection.sandbox import MAX_THREADS_PER_WORKER, Limits, Sandbox, Source, SqlError

#: workers a SandboxPool keeps by default
POOL_WORKERS = 2


class PoolClosed(SqlError):
    """The pool was closed (or replaced) while the query waited for a worker."""


@dataclass
class _Ticket:
    worker: int | None = None


class SandboxPool:
    """`workers` sandboxes over the same sources, shared fairly: each client (a session; by
    default the calling thread) has its own queue, clients are served in turn, and no client
    runs on more than all workers but one, so a hostile query leaves a worker for the others.
    Threads per worker default to the cores shared out, at most MAX_THREADS_PER_WORKER."""

    def __init__(
        self,
        sources: Sequence[Source] = (),
        limits: Limits = Limits(),
        label: str = "sql",
        workers: int = POOL_WORKERS,
        queue_timeout_s: float = 60.0,
        max_waiting: int = 8,
    ) -> None:
        n = max(1, int(workers))
        if limits.threads is None:
            cores = len(os.sched_getaffinity(0))
            limits = dataclasses.replace(
                limits, threads=max(1, min(MAX_THREADS_PER_WORKER, cores // n))
            )
        self.limits, self.label = limits, label
        self.workers = [Sandbox(sources, limits, f"{label}{i}") for i in range(n)]
        self.max_running = max(1, n - 1)
        self.queue_timeout_s, self.max_waiting = queue_timeout_s, max_waiting
        self._cond = threading.Condition()
        self._free = list(range(n))
        self._waiting: dict[str, deque[_Ticket]] = {}
        self._order: deque[str] = deque()  # clients with queries waiting, in serving order
        self._running: Counter[str] = Counter()
        self._holder: dict[int, str] = {}  # worker index -> the client running on it
        self._closed = False

    @property
    def pid(self) -> int | None:
        """The first worker's process id (None before it starts)."""
        return self.workers[0].pid

    @property
    def pids(self) -> list[int | None]:
        return [w.pid for w in self.workers]

    @property
    def layers(self) -> dict[str, Any]:
        """The OS layers of the first worker that started (all start the same way)."""
        return next((w.layers for w in self.workers if w.layers), {})

    def running(self) -> dict[str, list[int]]:
        """The workers (indices into `workers`) running a query now, per client."""
        with self._cond:
            out: dict[str, list[int]] = {}
            for index, key in sorted(self._holder.items()):
                out.setdefault(key, []).append(index)
            return out

    def waiting(self) -> dict[str, int]:
        """Queries waiting for a worker now, per client."""
        with self._cond:
            return {key: len(queue) for key, queue in self._waiting.items()}

    @property
    def restarts(self) -> int:
        return sum(w.restarts for w in self.workers)

    def start(self) -> "SandboxPool":
        """Start every worker at once and wait until all are ready."""
        for w in self.workers:
            w.spawn()
        for w in self.workers:
            w.start()
        return self

    def query(
        self,
        sql: str,
        row_cap: int | None = 10_000,
        tables: Mapping[str, pa.Table] | None = None,
        client: str | None = None,
    ) -> tuple[pa.Table, bool, float]:
        """`Sandbox.query` on the next worker this client's turn gets. SqlError as there, and
        when the client already has `max_waiting` queries waiting or none got a worker within
        `queue_timeout_s`; PoolClosed when the pool closed meanwhile."""
        key = client if client is not None else f"thread-{threading.get_ident()}"
        index = self._acquire(key)
        try:
            return self.workers[index].query(sql, row_cap, tables)
        finally:
            self._release(key, index)

    def _acquire(self, key: str) -> int:
        deadline = time.monotonic() + self.queue_timeout_s
        with self._cond:
            if self._closed:
                raise PoolClosed(f"{self.label}: the SQL workers were closed")
            queue = self._waiting.setdefault(key, deque())
            if len(queue) >= self.max_waiting:
                raise SqlError(
                    f"{self.max_waiting} queries of this session are already waiting; "
                    "let them finish first"
                )
            ticket = _Ticket()
            queue.append(ticket)
            if key not in self._order:
                self._order.append(key)
            self._dispatch()
            while ticket.worker is None:
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    self._forget(key, ticket)
                    if self._closed:
                        raise PoolClosed(f"{self.label}: the SQL workers were closed")
                    raise SqlError(
                        f"every SQL worker stayed busy for {self.queue_timeout_s:g} s; try again"
                    )
                self._cond.wait(left)
            return ticket.worker

    def _forget(self, key: str, ticket: _Ticket) -> None:
        queue = self._waiting.get(key)
        if queue is not None and ticket in queue:
            queue.remove(ticket)
        if queue is not None and not queue:
            del self._waiting[key]
            self._order.remove(key)

    def _dispatch(self) -> None:
        """Give free workers to waiting clients in turn (caller holds the condition)."""
        while self._free and self._order:
            for _ in range(len(self._order)):
                key = self._order[0]
                self._order.rotate(-1)  # served or not, it goes to the back of the line
                if self._running[key] < self.max_running:
                    break
            else:
                return  # every waiting client already runs its share
            queue = self._waiting[key]
            ticket = queue.popleft()
            if not queue:
                del self._waiting[key]
                self._order.remove(key)
            # a worker already up first: another's start would cost this query a second or more;
            # then the lowest index, so an idle pool's next query runs on its first worker (`pid`)
            self._free.sort(
                key=lambda i: (self.workers[i].available_at(), self.workers[i].pid is None, i)
            )
            ticket.worker = self._free.pop(0)
            self._running[key] += 1
            self._holder[ticket.worker] = key
            self._cond.notify_all()

    def _release(self, key: str, index: int) -> None:
        with self._cond:
            self._running[key] -= 1
            if self._running[key] <= 0:
                del self._running[key]
            self._holder.pop(index, None)
            self._free.append(index)
            self._dispatch()

    def close(self) -> None:
        """Refuse new queries, wake the waiting ones (PoolClosed), stop every worker once its
        running query is done."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for w in self.workers:
            w.close()

    def __enter__(self) -> "SandboxPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
