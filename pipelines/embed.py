"""`python -m pipelines.embed INPUT OUTPUT`: embed and score image–text shards into a collection.

One Dask task per input shard (img2dataset webdataset tars, parquet with image bytes, or
`files` folders, from any fsspec URL, brace patterns allowed). Each task writes part N
(N = the shard's position in the sorted input list): metadata/metadata_N.parquet,
img_emb/img_emb_N.npy, text_emb/text_emb_N.npy, then _done/N.json last. A rerun skips parts
already done from an unchanged shard, so an interrupted job resumes where it stopped.
Runs on a LocalCluster sized to this machine, or on any cluster via --scheduler.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import replace
from typing import Any, Sequence

from curation import schema as S
from pipelines.clip_speed import PRECISIONS, int8_device

log = logging.getLogger(__name__)


class EmbedJobError(RuntimeError):
    """Some shards could not be processed; the others were committed."""

    def __init__(self, failed: dict[str, str], summary: dict[str, Any]):
        self.failed, self.summary = failed, summary
        names = ", ".join(sorted(failed))
        super().__init__(f"{len(failed)} shard(s) failed: {names}")


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


#: cores per worker process on a GPU machine: its main thread driving the GPU, the rest decoding
GPU_WORKER_CORES = 4


def default_cluster_size(workers: int | None = None, threads_per_worker: int | None = None,
                         tasks: int | None = None, gpu: bool = False) -> tuple[int, int]:
    """Worker processes x torch threads per worker, using every core of this machine.

    On CPU one single-threaded worker per core beats fewer multi-threaded ones (each
    worker's reader thread then overlaps its own model instead of stalling a shared
    OpenMP team; measured in bench/embed.py). On a GPU, one worker process per
    GPU_WORKER_CORES cores, all sharing the GPU: one process's decode threads contend for
    its GIL with the thread launching the kernels, so on an H200 with 16 cores one worker
    embedded ViT-B-32 at 610 samples/s and four at 2,410, 0.94 of the bare forward
    (bench.embed_gpu). Never more workers than there are shards to give them.
    """
    cores = _cores()
    if workers is None:
        workers = max(1, cores // (threads_per_worker or (GPU_WORKER_CORES if gpu else 1)))
        if tasks:
            workers = max(1, min(workers, tasks))
    if threads_per_worker is None:
        threads_per_worker = max(1, cores // workers)
    return workers, threads_per_worker


def _gpu(device: str | None) -> bool:
    if device is not None:
        return device.startswith("cuda")
    import torch

    return torch.cuda.is_available()


def parse_scores(scores: str | Sequence[str] | None) -> tuple[str, ...]:
    """'nsfw,watermark' -> ('nsfw', 'watermark'), checked against pipelines.scorers."""
    if not scores:
        return ()
    names = tuple(s.strip() for s in (scores.split(",") if isinstance(scores, str) else scores) if s.strip())
    try:
        from pipelines.scorers import SCORER_NAMES
    except ImportError as exc:
        raise ValueError(f"--scores {','.join(names)} needs pipelines.scorers, which is not "
                         f"importable: {exc}") from exc
    unknown = [n for n in names if n not in SCORER_NAMES]
    if unknown:
        raise ValueError(f"unknown score(s) {unknown}; available: {list(SCORER_NAMES)}")
    return names


def _todo(shards, output: str, config, overwrite: bool) -> tuple[list, dict[int, dict], dict[int, dict]]:
    """Split shards into those to (re)do and those whose committed part is still valid."""
    from pipelines.readers import fingerprint
    from pipelines.writer import read_done

    todo, done, prints = [], {}, {}
    for shard in shards:
        prints[shard.index] = fingerprint(shard.url)
        stats = None if overwrite else read_done(output, shard.index)
        if (stats is not None and stats.get("source_shard") == shard.url
                and stats.get("input_fingerprint") == prints[shard.index]
                and stats.get("config") == config.identity()):
            done[shard.index] = stats
        else:
            todo.append(shard)
    return todo, done, prints


def _check_model(output: str, clip_model: str, overwrite: bool) -> dict[str, Any] | None:
    from pipelines.writer import read_collection_json

    existing = read_collection_json(output)
    if existing and not overwrite and existing.get("clip_model") not in (None, clip_model):
        raise ValueError(f"{output} holds embeddings from {existing['clip_model']!r}, not "
                         f"{clip_model!r}; use another OUTPUT or --overwrite")
    return existing


#: LocalCluster settings (Dask key -> value) that keep the cluster's housekeeping off the cores
#: the models run on. With one busy single-threaded worker per core, every wake-up of a
#: worker's event loop competes with its reader and model threads:
#: - the statistical profiler walks every thread's stack every 10 ms: ~10% of worker CPU;
#: - the memory monitor (100 ms), the system monitor (500 ms) and the event-loop health tick
#:   (20 ms) together cost ~8% of steady throughput (bench/embed.py, alternating runs).
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
#: activation buffers kept going back to the kernel and page-faulting in again (20-120 faults
#: a sample), and its forward ran 5-20% slower than the same model in a main thread. With one
#: arena the task thread uses the main heap, as the bare forward does (bench/embed.py). Workers
#: with more threads (a reader thread beside the model) keep glibc's per-thread arenas.
SINGLE_THREAD_WORKER_ENV = {"MALLOC_ARENA_MAX": "1"}


def _client(scheduler: str | None, workers: int, threads: int = 1, gpu: bool = False):
    """A Dask client: to `scheduler` if given, else to a new LocalCluster; returns (client, cluster).

    A variable of SINGLE_THREAD_WORKER_ENV that the environment already sets keeps its value
    (Dask's rule for nanny environments).
    """
    from distributed import Client, LocalCluster

    if scheduler:
        return Client(scheduler), None
    import dask

    settings = _quiet_cluster_config()
    if threads == 1 and not gpu:
        spawn_env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
        settings["distributed.nanny.pre-spawn-environ"] = {**spawn_env, **SINGLE_THREAD_WORKER_ENV}
    # one task slot per worker process: the model uses the threads, not Dask
    with dask.config.set(settings):
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=":0", silence_logs=logging.WARNING)
    return Client(cluster), cluster


def _prepare_workers(client, config) -> None:
    """Load the models on every worker of our LocalCluster at once, before any shard starts.

    Otherwise the first worker to finish loading processes its first shard beside the others'
    loading: on a small job that start-up overlap is most of what a shard costs. A load that
    fails here is left for the shard tasks to report, shard by shard, as before.
    """
    start = time.time()
    futures = [client.submit(_prepared, config, workers=[address], allow_other_workers=False,
                             pure=False, key=f"embed-prepare-{i}-{time.time_ns()}")
               for i, address in enumerate(client.scheduler_info()["workers"])]
    errors = [str(e) for e in client.gather(futures, errors="skip") if e]
    log.info("workers prepared in %.1f s%s", time.time() - start, f" ({errors[0]})" if errors else "")


def _prepared(config) -> str | None:
    """`embed_worker.prepare` in a worker's task thread (as its shards will run); an error comes back as text."""
    from pipelines.embed_worker import prepare

    try:
        prepare(config)
    except Exception as exc:  # noqa: BLE001 - reported by each shard's own task
        return f"{type(exc).__name__}: {exc}"
    return None


def _run_tasks(client, todo, output, config, prints) -> tuple[dict[int, dict], dict[str, str]]:
    """Submit one task per shard; show shards done and samples/s; collect stats and failures."""
    from distributed import as_completed
    from tqdm import tqdm

    from pipelines.embed_worker import process_shard

    futures = {client.submit(process_shard, shard, output, config, prints[shard.index],
                             key=f"embed-part-{shard.index}-{time.time_ns()}", pure=False,
                             retries=0): shard for shard in todo}
    results, failed = {}, {}
    samples, start = 0, time.time()
    with tqdm(total=len(todo), desc="shards", unit="shard", file=sys.stderr) as bar:
        for fut in as_completed(futures):
            shard = futures[fut]
            try:
                stats = fut.result()
            except Exception as exc:  # noqa: BLE001 - any task failure is reported per shard
                failed[shard.url] = f"{type(exc).__name__}: {exc}"
                log.error("shard %s (part %d) failed: %s", shard.url, shard.index, failed[shard.url])
            else:
                results[shard.index] = stats
                samples += stats["count"]
            bar.update(1)
            bar.set_postfix(samples=samples, samples_per_s=f"{samples / max(time.time() - start, 1e-9):.1f}",
                            failed=len(failed))
    return results, failed


def embed(input: str | Sequence[str], output: str, clip_model: str = "sieve-tiny",
          batch_size: int = 256, workers: int | None = None, threads_per_worker: int | None = None,
          scheduler: str | None = None, scores: str | Sequence[str] | None = None,
          overwrite: bool = False, precision: str = "fp32", input_format: str = "auto",
          max_pixels: int | None = None, device: str | None = None,
          clip_options: dict[str, Any] | None = None, decode_threads: int | None = None,
          client: Any = None) -> dict[str, Any]:
    """Build (or resume) the collection at `output` from the shards in `input`; return a summary.

    Raises EmbedJobError, after committing every other shard, when some shards failed.
    `client` (Python API only) reuses an existing distributed.Client.
    """
    from pipelines.decode import DEFAULT_MAX_PIXELS
    from pipelines.embed_worker import EmbedConfig
    from pipelines.readers import list_shards
    from pipelines.writer import clear_parts, write_collection_json

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "int8":
        device = int8_device(device)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if decode_threads is not None and decode_threads < 1:
        raise ValueError(f"decode_threads must be >= 1, got {decode_threads}")
    shards = list_shards(input, input_format)
    if not shards:
        raise ValueError(f"no shards found in {input!r}")
    config = EmbedConfig(clip_model=clip_model, batch_size=batch_size, scores=parse_scores(scores),
                         precision=precision, device=device, max_pixels=max_pixels or DEFAULT_MAX_PIXELS,
                         decode_threads=decode_threads,
                         clip_options=tuple(sorted((clip_options or {}).items())))
    existing = _check_model(output, clip_model, overwrite)
    if overwrite:
        log.info("--overwrite: removed %d files of earlier parts", clear_parts(output))
    todo, done, prints = _todo(shards, output, config, overwrite)
    log.info("%d shards: %d to do, %d already done", len(shards), len(todo), len(done))
    failed: dict[str, str] = {}
    if todo:
        own = client is None
        cluster = None
        gpu = _gpu(device) if own and not scheduler else False
        n_workers, threads = default_cluster_size(workers, threads_per_worker, len(todo), gpu=gpu)
        # on someone else's cluster, threads default to each worker's share of its machine
        config = replace(config, threads=threads if (own and not scheduler) or threads_per_worker else None)
        if own:
            # Dask's nanny copies its worker environment into this process: undo that afterwards
            env_before = {k: os.environ.get(k) for k in SINGLE_THREAD_WORKER_ENV}
            client, cluster = _client(scheduler, n_workers, threads, gpu=gpu)
            log.info("LocalCluster: %d worker(s) x %d torch thread(s)", n_workers, threads)
        print(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr, flush=True)
        try:
            if own and not scheduler:
                _prepare_workers(client, config)
            results, failed = _run_tasks(client, todo, output, config, prints)
        finally:
            if own:
                client.close()
                if cluster is not None:
                    cluster.close()
                _restore_env(env_before)
        done.update(results)
    parts = [done[i] for i in sorted(done)]
    emb_dim = next((p["emb_dim"] for p in parts), (existing or {}).get("emb_dim"))
    summary = {
        "clip_model": clip_model, "emb_dim": emb_dim, "source": input if isinstance(input, str) else list(input),
        "scores": list(config.scores), "parts": len(parts), "shards": len(shards),
        "count": sum(p["count"] for p in parts), "ok": sum(p["ok"] for p in parts),
        "status_counts": _sum_counts(p["status_counts"] for p in parts),
        "failed_shards": failed, "processed_now": len(todo) - len(failed),
    }
    if existing and not overwrite and "created" in existing:
        summary["created"] = existing["created"]
    write_collection_json(output, summary)
    if failed:
        raise EmbedJobError(failed, summary)
    return summary


def _restore_env(values: dict[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _sum_counts(counts) -> dict[str, int]:
    total: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.embed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="shards: folder, file, glob or brace pattern (any fsspec URL)")
    parser.add_argument("output", help="collection folder (any fsspec URL)")
    parser.add_argument("--clip-model", default="sieve-tiny",
                        help="CLIP spec, e.g. sieve-tiny or open_clip:ViT-B-32/laion2b_s34b_b79k")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=None, help="LocalCluster worker processes")
    parser.add_argument("--threads-per-worker", type=int, default=None, help="torch threads per worker")
    parser.add_argument("--scheduler", default=None, help="existing Dask scheduler, e.g. tcp://host:8786")
    parser.add_argument("--scores", default="", help="comma list of nsfw,watermark,toxicity")
    parser.add_argument("--overwrite", action="store_true", help="redo every part")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="bf16: weights in bf16 where the CPU/GPU has native bf16 (else fp32); "
                             "int8: dynamically quantized Linear layers, CPU only (about 2x fp32 "
                             "on VNNI CPUs, embeddings within ~0.999 cosine)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC layout for the image tower")
    parser.add_argument("--compile", action="store_true", help="torch.compile the image tower")
    parser.add_argument("--no-trim-text", action="store_true",
                        help="run the text tower on the full context (trimming is exact, so rarely useful)")
    parser.add_argument("--input-format", default="auto", choices=("auto", "webdataset", "parquet", "files"))
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="images over this many pixels get status too_large (default PIL's limit)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--decode-threads", type=int, default=None,
                        help="threads per worker decoding and resizing images (default: on a GPU, "
                             "its worker's threads but one; on CPU 1, the reader itself)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = embed(args.input, args.output, clip_model=args.clip_model, batch_size=args.batch_size,
                        workers=args.workers, threads_per_worker=args.threads_per_worker,
                        scheduler=args.scheduler, scores=args.scores, overwrite=args.overwrite,
                        precision=args.precision, input_format=args.input_format,
                        max_pixels=args.max_pixels, device=args.device, decode_threads=args.decode_threads,
                        clip_options={"channels_last": args.channels_last, "compile": args.compile,
                                      "trim_text": not args.no_trim_text})
    except EmbedJobError as exc:
        print(json.dumps(exc.summary, default=str))
        for url, error in sorted(exc.failed.items()):
            print(f"FAILED {url}: {error}", file=sys.stderr)
        return 1
    except ValueError as exc:
        parser.error(str(exc))
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
