"""The one Dask client life cycle of every Sieve job: start a LocalCluster (or connect to a
`--scheduler` address), submit one task per part or group, close everything, restore the env.

Whatever Sieve starts listens on loopback only: the scheduler, the workers and the dashboard of
a LocalCluster bind to 127.0.0.1 (a cluster across machines is the user's own, given by its
address). A LocalCluster's nanny copies its workers' environment into this process before it
spawns them; `DaskCluster.close` puts the caller's values back, on an error or Ctrl-C too.
What runs on the workers, and how many there are (the GPU policy of `pipelines.embed_cluster`), is
the caller's business; results come back as they complete, so the caller draws its progress.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import dask
from distributed import Client, LocalCluster, as_completed
from distributed.utils import format_dashboard_link

log = logging.getLogger(__name__)

#: the only interface a cluster Sieve starts may listen on
LOOPBACK = "127.0.0.1"

#: LocalCluster settings (Dask key -> value) that keep the cluster's housekeeping off the cores
#: the tasks run on. With one busy single-threaded worker per core, every wake-up of a
#: worker's event loop competes with its reader and model threads:
#: - the statistical profiler walks every thread's stack every 10 ms;
#: - the memory monitor (100 ms), the system monitor (500 ms) and the event-loop health tick
#:   (20 ms) wake it between batches (measured side by side with `python -m bench.embed`).
#: The memory limits are still enforced, once a second instead of ten times.
QUIET_CLUSTER = {
    "distributed.worker.profile.enabled": False,
    "distributed.worker.memory.monitor-interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.admin.tick.interval": "500ms",
}

#: Environment of single-thread CPU worker processes, set before each one starts (glibc reads
#: it only then). Dask runs tasks in a pool thread, and glibc gives each thread its own malloc
#: arena: a thread arena's heaps are capped at 64 MiB, so a forward's large activation buffers
#: kept going back to the kernel and page-faulting in again, and the forward ran slower than
#: the same model in a main thread. With one arena the task thread uses the main heap, as the
#: bare forward does (`python -m bench.embed`, scale part). Workers with more threads (a
#: reader thread beside the model) keep glibc's per-thread arenas.
#: Dask's own pre-spawn setting MALLOC_TRIM_THRESHOLD_=65536 turns off glibc's sliding mmap
#: threshold, so every array over 128 KiB was mapped, zero-filled by the kernel and unmapped
#: again: uniqueness at 4M rows spent 131 s in the kernel beside 222 s of its own (19 s with
#: the thresholds glibc would slide to on its own, 32 MiB and twice that, and 30% less wall).
SINGLE_THREAD_WORKER_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(64 << 20),
}

#: what a nanny sets in its own process besides the configured pre-spawn environment
_NANNY_ENV = ("PYTHONHASHSEED",)
_PRE_SPAWN = "distributed.nanny.pre-spawn-environ"


def quiet_cluster_config() -> dict[str, Any]:
    """QUIET_CLUSTER minus any key the environment sets itself (DASK_DISTRIBUTED__...)."""

    def env_name(key: str) -> str:
        return "DASK_" + key.upper().replace(".", "__").replace("-", "_")

    return {k: v for k, v in QUIET_CLUSTER.items() if env_name(k) not in os.environ}


def restore_env(values: Mapping[str, str | None]) -> None:
    """Set each variable back to its value (None: unset it)."""
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


class DaskCluster:
    """A Dask client and, when it started one, its LocalCluster: closed together (a `with`
    block closes them on an error or Ctrl-C too), the caller's environment then restored."""

    def __init__(
        self, client: Client, cluster: LocalCluster | None, env_before: dict[str, str | None]
    ) -> None:
        self.client = client
        self.cluster = cluster
        self._env_before = env_before
        self.closed = False

    @property
    def dashboard_link(self) -> str:
        """The dashboard's address ("" without one). Dask names an in-process cluster's host
        by this machine's IP; ours listens on loopback, so the link says so."""
        if self.cluster is None:
            return str(self.client.dashboard_link)
        port = self.client.scheduler_info().get("services", {}).get("dashboard")
        return format_dashboard_link(LOOPBACK, port) if port else ""

    @property
    def slots(self) -> int:
        """Task slots (worker threads) the scheduler has now."""
        return max(1, sum(self.client.nthreads().values()))

    def close(self, timeout: float | None = None) -> None:
        """Close the client, then the LocalCluster we started, then restore the environment."""
        if self.closed:
            return
        self.closed = True
        try:
            # Client.close's own default (twice its connect timeout) unless a limit is given
            self.client.close(**({} if timeout is None else {"timeout": timeout}))
        finally:
            try:
                if self.cluster is not None:
                    self.cluster.close(timeout=timeout)
            finally:
                restore_env(self._env_before)

    def __enter__(self) -> DaskCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_cluster(
    scheduler: str | None = None,
    workers: int = 1,
    threads_per_worker: int = 1,
    processes: bool = True,
    worker_env: Mapping[str, str] | None = None,
    config: Mapping[str, Any] | None = None,
) -> DaskCluster:
    """A client to `scheduler` when given, else to a new LocalCluster on 127.0.0.1.

    The LocalCluster has `workers` worker processes (threads of this process when `processes`
    is False) with `threads_per_worker` task slots each; `worker_env` is set in each worker
    process before it starts (a variable the environment already sets keeps its value: Dask's
    rule for nanny environments); `config` adds Dask settings to QUIET_CLUSTER's. The dashboard
    link is logged.
    """
    if scheduler:
        client = Client(scheduler)
        log.info("Dask scheduler %s, dashboard: %s", scheduler, client.dashboard_link)
        return DaskCluster(client, None, {})
    settings = {**quiet_cluster_config(), **(config or {})}
    if worker_env:
        settings[_PRE_SPAWN] = {**dict(dask.config.get(_PRE_SPAWN, {})), **worker_env}
    with dask.config.set(settings):
        keys = {*dask.config.get(_PRE_SPAWN, {}), *_NANNY_ENV}
        env_before = {k: os.environ.get(k) for k in keys}
        cluster = client = None
        try:
            cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=threads_per_worker,
                processes=processes,
                # worker threads of this process talk to the scheduler in memory (inproc://)
                host=LOOPBACK if processes else None,
                dashboard_address=f"{LOOPBACK}:0",
                # a worker's HTTP server (health, metrics) binds the host of its address, and an
                # inproc:// one has none: without an address it would listen on every interface
                worker_dashboard_address=None if processes else f"{LOOPBACK}:0",
                silence_logs=logging.WARNING,
            )
            client = Client(cluster)
        except BaseException:
            # a start cut short (Ctrl-C included) leaves nothing running and the env as it was
            if cluster is not None:
                cluster.close()
            restore_env(env_before)
            raise
    session = DaskCluster(client, cluster, env_before)
    log.info(
        "LocalCluster on %s: %d worker(s) x %d thread(s), dashboard: %s",
        LOOPBACK,
        workers,
        threads_per_worker,
        session.dashboard_link,
    )
    return session


@dataclass(frozen=True)
class Outcome:
    """One task's end: its position among the submitted ones, and its value or its error."""

    index: int
    value: Any = None
    error: BaseException | None = None


def each_completed(
    client: Client,
    fn: Callable[..., Any],
    args: Sequence[tuple],
    name: str,
    **submit: Any,
) -> Iterator[Outcome]:
    """Submit `fn(*a)` for every `a` in `args` (one task per part or group), then yield each
    task's Outcome as it completes. Tasks still running when the caller stops early (an error,
    Ctrl-C, a `break`) are cancelled."""
    stamp = time.time_ns()  # keys unique per call: Dask would otherwise reuse an earlier result
    futures = {
        client.submit(fn, *a, key=f"{name}-{i}-{stamp}", pure=False, retries=0, **submit): i
        for i, a in enumerate(args)
    }
    try:
        for fut in as_completed(futures):
            i = futures.pop(fut)
            try:
                value = fut.result()
            except Exception as exc:  # noqa: BLE001 - each task's failure goes to its caller
                yield Outcome(i, error=exc)
            else:
                yield Outcome(i, value)
    finally:
        if futures:
            client.cancel(list(futures))
