"""The Dask side of `pipelines.embed`: the LocalCluster (or a given scheduler), the workers'
preparation, one task per shard and the progress of the whole job.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import dask
import torch
from distributed import Client, LocalCluster, as_completed

from collection.shards import Shard
from models.runtime import cores, progress
from pipelines.embed_worker import EmbedConfig, prepare, process_shard

log = logging.getLogger(__name__)


#: cores per worker process on a GPU machine: its main thread driving the GPU, the rest decoding
GPU_WORKER_CORES = 4


def default_cluster_size(
    workers: int | None = None,
    threads_per_worker: int | None = None,
    tasks: int | None = None,
    gpu: bool = False,
) -> tuple[int, int]:
    """Worker processes x torch threads per worker, using every core of this machine.

    On CPU one single-threaded worker per core beats fewer multi-threaded ones (each
    worker's reader thread then overlaps its own model instead of stalling a shared
    OpenMP team; measured in bench/embed.py). On a GPU, one worker process per
    GPU_WORKER_CORES cores, all sharing the GPU: one process's decode threads contend for
    its GIL with the thread launching the kernels, so several processes keep a GPU busier than
    one (bench/results/embed_gpu.json, `pipeline`). Never more workers than there are shards.
    """
    n_cores = cores()
    if workers is None:
        workers = max(1, n_cores // (threads_per_worker or (GPU_WORKER_CORES if gpu else 1)))
        if tasks:
            workers = max(1, min(workers, tasks))
    if threads_per_worker is None:
        threads_per_worker = max(1, n_cores // workers)
    return workers, threads_per_worker


def uses_gpu(device: str | None) -> bool:
    """Whether workers given `device` (None: cuda when available) run on a GPU."""
    if device is not None:
        return device.startswith("cuda")
    return torch.cuda.is_available()


#: LocalCluster settings (Dask key -> value) that keep the cluster's housekeeping off the cores
#: the models run on. With one busy single-threaded worker per core, every wake-up of a
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


def _quiet_cluster_config() -> dict[str, Any]:
    """QUIET_CLUSTER minus any key the environment sets itself (DASK_DISTRIBUTED__...)."""

    def env_name(key: str) -> str:
        return "DASK_" + key.upper().replace(".", "__").replace("-", "_")

    return {k: v for k, v in QUIET_CLUSTER.items() if env_name(k) not in os.environ}


#: Environment of single-thread CPU LocalCluster workers, set before each worker process starts
#: (glibc reads it only then). Dask runs tasks in a pool thread, and glibc gives each thread its
#: own malloc arena: a thread arena's heaps are capped at 64 MiB, so the forward's large
#: activation buffers kept going back to the kernel and page-faulting in again, and its forward
#: ran slower than the same model in a main thread. With one arena the task thread uses the
#: main heap, as the bare forward does (`python -m bench.embed`, scale part). Workers
#: with more threads (a reader thread beside the model) keep glibc's per-thread arenas.
SINGLE_THREAD_WORKER_ENV = {"MALLOC_ARENA_MAX": "1"}


def start_client(
    scheduler: str | None, workers: int, threads: int = 1, gpu: bool = False
) -> tuple[Client, Any]:
    """A Dask client: to `scheduler` if given, else to a new LocalCluster; returns (client, cluster).

    A variable of SINGLE_THREAD_WORKER_ENV that the environment already sets keeps its value
    (Dask's rule for nanny environments).
    """
    if scheduler:
        return Client(scheduler), None
    settings = _quiet_cluster_config()
    if threads == 1 and not gpu:
        spawn_env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
        settings["distributed.nanny.pre-spawn-environ"] = {**spawn_env, **SINGLE_THREAD_WORKER_ENV}
    # one task slot per worker process: the model uses the threads, not Dask
    with dask.config.set(settings):
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            silence_logs=logging.WARNING,
        )
    return Client(cluster), cluster


def prepare_workers(client: Client, config: EmbedConfig) -> None:
    """Load the models on every worker of our LocalCluster at once, before any shard starts.

    Otherwise the first worker to finish loading processes its first shard beside the others'
    loading: on a small job that start-up overlap is most of what a shard costs. A load that
    fails here is left for the shard tasks to report, shard by shard, as before.
    """
    start = time.time()
    futures = [
        client.submit(
            _prepared,
            config,
            workers=[address],
            allow_other_workers=False,
            pure=False,
            key=f"embed-prepare-{i}-{time.time_ns()}",
        )
        for i, address in enumerate(client.scheduler_info()["workers"])
    ]
    errors = [str(e) for e in client.gather(futures, errors="skip") if e]
    log.info(
        "workers prepared in %.1f s%s", time.time() - start, f" ({errors[0]})" if errors else ""
    )


def _prepared(config: EmbedConfig) -> str | None:
    """`embed_worker.prepare` in a worker's task thread (as its shards will run); an error comes back as text."""
    try:
        prepare(config)
    except Exception as exc:  # noqa: BLE001 - reported by each shard's own task
        return f"{type(exc).__name__}: {exc}"
    return None


def run_tasks(
    client: Client, todo: list[Shard], output: str, config: EmbedConfig, prints: dict[int, dict]
) -> tuple[dict[int, dict], dict[str, str]]:
    """Submit one task per shard; show shards done and samples/s; collect stats and failures."""
    futures = {
        client.submit(
            process_shard,
            shard,
            output,
            config,
            prints[shard.index],
            key=f"embed-part-{shard.index}-{time.time_ns()}",
            pure=False,
            retries=0,
        ): shard
        for shard in todo
    }
    results, failed = {}, {}
    samples, start = 0, time.time()
    with progress(total=len(todo), desc="shards", unit="shard") as bar:
        for fut in as_completed(futures):
            shard = futures[fut]
            try:
                stats = fut.result()
            except Exception as exc:  # noqa: BLE001 - any task failure is reported per shard
                failed[shard.url] = f"{type(exc).__name__}: {exc}"
                log.error(
                    "shard %s (part %d) failed: %s", shard.url, shard.index, failed[shard.url]
                )
            else:
                results[shard.index] = stats
                samples += stats["count"]
            bar.update(1)
            bar.set_postfix(
                samples=samples,
                samples_per_s=f"{samples / max(time.time() - start, 1e-9):.1f}",
                failed=len(failed),
            )
    return results, failed


def restore_env(values: dict[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
