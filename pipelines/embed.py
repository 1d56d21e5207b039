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
import sys
from dataclasses import replace
from typing import Any, Sequence

from collection.cluster_options import add_cluster_options
from collection.shards import Shard, fingerprint, list_shards
from collection.storage import read_collection_json, write_collection_json
from models.runtime import setup_logging
from models.specs import PRECISIONS, check_precision, int8_device, parse_spec
from pipelines.decode import DEFAULT_MAX_PIXELS
from pipelines.embed_writer import clear_parts, read_done
from pipelines.scorers import SCORER_NAMES

log = logging.getLogger(__name__)


class EmbedJobError(RuntimeError):
    """Some shards could not be processed; the others were committed."""

    def __init__(self, failed: dict[str, str], summary: dict[str, Any]):
        self.failed, self.summary = failed, summary
        names = ", ".join(sorted(failed))
        super().__init__(f"{len(failed)} shard(s) failed: {names}")


def parse_scores(scores: str | Sequence[str] | None) -> tuple[str, ...]:
    """'nsfw,watermark' -> ('nsfw', 'watermark'), checked against pipelines.scorers."""
    if not scores:
        return ()
    names = tuple(
        s.strip() for s in (scores.split(",") if isinstance(scores, str) else scores) if s.strip()
    )
    unknown = [n for n in names if n not in SCORER_NAMES]
    if unknown:
        raise ValueError(f"unknown score(s) {unknown}; available: {list(SCORER_NAMES)}")
    return names


def _todo(
    shards: list[Shard], output: str, identity: dict[str, Any], overwrite: bool
) -> tuple[list[Shard], dict[int, dict], dict[int, dict]]:
    """Split shards into those to (re)do and those whose committed part is still valid."""
    todo, done, prints = [], {}, {}
    for shard in shards:
        prints[shard.index] = fingerprint(shard.url)
        stats = None if overwrite else read_done(output, shard.index)
        if (
            stats is not None
            and stats.get("source_shard") == shard.url
            and stats.get("input_fingerprint") == prints[shard.index]
            and stats.get("config") == identity
        ):
            done[shard.index] = stats
        else:
            todo.append(shard)
    return todo, done, prints


def _check_model(output: str, clip_model: str, overwrite: bool) -> dict[str, Any]:
    existing = read_collection_json(output)
    if existing and not overwrite and existing.get("clip_model") not in (None, clip_model):
        raise ValueError(
            f"{output} holds embeddings from {existing['clip_model']!r}, not "
            f"{clip_model!r}; use another OUTPUT or --overwrite"
        )
    return existing


def embed(
    input: str | Sequence[str],
    output: str,
    clip_model: str = "sieve-tiny",
    batch_size: int = 256,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    scheduler: str | None = None,
    scores: str | Sequence[str] | None = None,
    overwrite: bool = False,
    precision: str = "fp32",
    input_format: str = "auto",
    max_pixels: int | None = None,
    device: str | None = None,
    clip_options: dict[str, Any] | None = None,
    decode_threads: int | None = None,
    client: Any = None,
) -> dict[str, Any]:
    """Build (or resume) the collection at `output` from the shards in `input`; return a summary.

    Raises EmbedJobError, after committing every other shard, when some shards failed.
    `client` (Python API only) reuses an existing distributed.Client.
    """
    from pipelines import (
        embed_cluster as cluster,
        embed_worker,
    )  # heavy (Dask, torch): after argument parsing, so --help answers at once

    parse_spec(clip_model)
    check_precision(precision)
    if precision == "int8":
        device = int8_device(device)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if decode_threads is not None and decode_threads < 1:
        raise ValueError(f"decode_threads must be >= 1, got {decode_threads}")
    shards = list_shards(input, input_format)
    if not shards:
        raise ValueError(f"no shards found in {input!r}")
    config = embed_worker.EmbedConfig(
        clip_model=clip_model,
        batch_size=batch_size,
        scores=parse_scores(scores),
        precision=precision,
        device=device,
        max_pixels=max_pixels or DEFAULT_MAX_PIXELS,
        decode_threads=decode_threads,
        clip_options=tuple(sorted((clip_options or {}).items())),
    )
    existing = _check_model(output, clip_model, overwrite)
    if overwrite:
        log.info("--overwrite: removed %d files of earlier parts", clear_parts(output))
    todo, done, prints = _todo(shards, output, config.identity(), overwrite)
    log.info("%d shards: %d to do, %d already done", len(shards), len(todo), len(done))
    failed: dict[str, str] = {}
    if todo:
        own = client is None
        gpu = cluster.uses_gpu(device) if own and not scheduler else False
        n_workers, threads = cluster.default_cluster_size(
            workers, threads_per_worker, len(todo), gpu=gpu
        )
        # on someone else's cluster, threads default to each worker's share of its machine
        config = replace(
            config, threads=threads if (own and not scheduler) or threads_per_worker else None
        )
        session = cluster.start_client(scheduler, n_workers, threads, gpu=gpu) if own else None
        try:
            if session is not None:
                client = session.client
            if own and not scheduler:
                log.info("embedding with %d worker(s) x %d torch thread(s)", n_workers, threads)
                cluster.prepare_workers(client, config)
            results, failed = cluster.run_tasks(client, todo, output, config, prints)
        finally:
            if session is not None:
                session.close()  # the caller's environment is restored here too
        done.update(results)
    parts = [done[i] for i in sorted(done)]
    emb_dim = next((p["emb_dim"] for p in parts), existing.get("emb_dim"))
    summary = {
        "clip_model": clip_model,
        "emb_dim": emb_dim,
        "source": input if isinstance(input, str) else list(input),
        "scores": list(config.scores),
        "parts": len(parts),
        "shards": len(shards),
        "count": sum(p["count"] for p in parts),
        "ok": sum(p["ok"] for p in parts),
        "status_counts": _sum_counts(p["status_counts"] for p in parts),
        "failed_shards": failed,
        "processed_now": len(todo) - len(failed),
    }
    if existing and not overwrite and "created" in existing:
        summary["created"] = existing["created"]
    write_collection_json(output, summary)
    if failed:
        raise EmbedJobError(failed, summary)
    return summary


def _sum_counts(counts) -> dict[str, int]:
    total: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.embed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "input", help="shards: folder, file, glob or brace pattern (any fsspec URL)"
    )
    parser.add_argument("output", help="collection folder (any fsspec URL)")
    parser.add_argument(
        "--clip-model",
        default="sieve-tiny",
        help="CLIP spec, e.g. sieve-tiny or open_clip:ViT-B-32/laion2b_s34b_b79k",
    )
    parser.add_argument("--batch-size", type=int, default=256)
    add_cluster_options(parser, "LocalCluster worker processes")
    parser.add_argument(
        "--threads-per-worker", type=int, default=None, help="torch threads per worker"
    )
    parser.add_argument("--scores", default="", help="comma list of nsfw,watermark,toxicity")
    parser.add_argument("--overwrite", action="store_true", help="redo every part")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="bf16: weights in bf16 where the CPU/GPU has native bf16 (else fp32); "
        "int8: dynamically quantized Linear layers, CPU only (speed and cosine "
        "to fp32 in bench/results/embed.json)",
    )
    parser.add_argument(
        "--channels-last", action="store_true", help="NHWC layout for the image tower"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the image tower")
    parser.add_argument(
        "--no-trim-text",
        action="store_true",
        help="run the text tower on the full context (trimming is exact, so rarely useful)",
    )
    parser.add_argument(
        "--input-format", default="auto", choices=("auto", "webdataset", "parquet", "files")
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="images over this many pixels get status too_large (default PIL's limit)",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument(
        "--decode-threads",
        type=int,
        default=None,
        help="threads per worker decoding and resizing images (default: on a GPU, "
        "its worker's threads but one; on CPU 1, the reader itself)",
    )
    args = parser.parse_args(argv)
    setup_logging()
    try:
        summary = embed(
            args.input,
            args.output,
            clip_model=args.clip_model,
            batch_size=args.batch_size,
            workers=args.workers,
            threads_per_worker=args.threads_per_worker,
            scheduler=args.scheduler,
            scores=args.scores,
            overwrite=args.overwrite,
            precision=args.precision,
            input_format=args.input_format,
            max_pixels=args.max_pixels,
            device=args.device,
            decode_threads=args.decode_threads,
            clip_options={
                "channels_last": args.channels_last,
                "compile": args.compile,
                "trim_text": not args.no_trim_text,
            },
        )
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
