"""The Dask side of `pipelines.embed` on top of `collection.cluster`: how many workers and threads
(the CPU and GPU policy), the workers' preparation, one task per shard and the job's progress.
"""

from __future__ import annotations

import logging
import time

import torch
from distributed import Client

from collection.cluster import SINGLE_THREAD_WORKER_ENV, DaskCluster, each_completed, open_cluster
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


def start_client(
    scheduler: str | None, workers: int, threads: int = 1, gpu: bool = False
) -> DaskCluster:
    """The embed job's Dask client: to `scheduler` if given, else a LocalCluster of `workers`
    processes with one task slot each (the model uses the `threads`, not Dask); single-thread
    CPU workers get SINGLE_THREAD_WORKER_ENV."""
    single = threads == 1 and not gpu
    return open_cluster(
        scheduler, workers, 1, worker_env=SINGLE_THREAD_WORKER_ENV if single else None
    )


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
    """`embed_worker.prepare` in a worker's task thread (as its shards will run);
    an error comes back as text."""
    try:
        prepare(config)
    except Exception as exc:  # noqa: BLE001 - reported by each shard's own task
        return f"{type(exc).__name__}: {exc}"
    return None


def run_tasks(
    client: Client, todo: list[Shard], output: str, config: EmbedConfig, prints: dict[int, dict]
) -> tuple[dict[int, dict], dict[str, str]]:
    """Submit one task per shard; show shards done and samples/s; collect stats and failures."""
    args = [(shard, output, config, prints[shard.index]) for shard in todo]
    results, failed = {}, {}
    samples, start = 0, time.time()
    with progress(total=len(todo), desc="shards", unit="shard") as bar:
        for done in each_completed(client, process_shard, args, "embed-part"):
            shard = todo[done.index]
            if done.error is not None:
                failed[shard.url] = f"{type(done.error).__name__}: {done.error}"
                log.error(
                    "shard %s (part %d) failed: %s", shard.url, shard.index, failed[shard.url]
                )
            else:
                results[shard.index] = done.value
                samples += done.value["count"]
            bar.update(1)
            bar.set_postfix(
                samples=samples,
                samples_per_s=f"{samples / max(time.time() - start, 1e-9):.1f}",
                failed=len(failed),
            )
    return results, failed
