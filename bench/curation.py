"""`python -m bench.curation [--only export]` -> bench/results/curation.json.

export: `curation.export` of N generated samples (no resize, webdataset with both embeddings)
against a plain copy of the same source tars, each run on the same Dask workers and timed side
by side (alternating, `--repeats` times, median ratio): `export_samples_per_s`,
`export_vs_tar_copy_ratio` (goal >= 0.5). The collection is the generated shards with the rows
the embed job records and random CLIP-shaped vectors (`bench.synthetic.collection_from_shards`),
so the figure is the export's own cost, not CLIP's. Data is cached under --work.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from distributed import Client, LocalCluster

from bench.common import write_results
from bench.synthetic import collection_from_shards
from curation.export import export
from curation.storage import atomic_path
from models.runtime import cores, setup_logging
from pipelines.readers import list_shards
from pipelines.sample import write_sample_dataset

log = logging.getLogger(__name__)


def copy_file(src: str, dst: str) -> int:
    """The baseline: read a source tar and write it elsewhere, as plainly as Python can."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
    return os.path.getsize(dst)


def _data(work: Path, n: int, size: int, shard_size: int, dim: int) -> str:
    """Generated shards and their collection under `work` (reused when already there)."""
    shards, coll = work / f"shards_{n}_{size}_{shard_size}", work / f"coll_{n}_{size}_{shard_size}_{dim}"
    if not (shards / "_complete").exists():
        write_sample_dataset(shards, n, size=size, shard_size=shard_size, watermark_fraction=0.0)
        (shards / "_complete").write_text("")
    if not (coll / "collection.json").exists():
        with atomic_path(coll) as tmp:
            collection_from_shards(str(shards), tmp, dim=dim)
    return str(coll)


def bench_export(work: Path, n: int = 50_000, size: int = 64, shard_size: int = 10_000, repeats: int = 3,
                 workers: int | None = None, dim: int = 128) -> dict[str, Any]:
    """Export vs tar copy, side by side on one LocalCluster (dim: sieve-tiny's, which embeds generated data)."""
    coll = _data(work, n, size, shard_size, dim)
    tars = [s.url for s in list_shards(str(work / f"shards_{n}_{size}_{shard_size}"))]
    workers = workers or cores()
    spec = {"name": "everything", "where": "true"}
    runs = []
    with LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=":0",
                      silence_logs=logging.WARNING) as cluster, Client(cluster) as client:
        export(coll, spec, str(work / "warm_up"), shard_size=shard_size, client=client)  # workers import and open once
        for r in range(repeats):
            out, copy = work / "export_out", work / "copy_out"
            for d in (out, copy):
                shutil.rmtree(d, ignore_errors=True)
            copy.mkdir(parents=True)
            t0 = time.perf_counter()
            copied = sum(client.gather(client.map(copy_file, tars, [str(copy / Path(t).name) for t in tars],
                                                  pure=False)))
            copy_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            manifest = export(coll, spec, str(out), shard_size=shard_size, client=client)
            export_s = time.perf_counter() - t0
            written = sum(p.stat().st_size for p in out.glob("*.tar"))
            runs.append({"copy_s": copy_s, "export_s": export_s, "samples": manifest["count"],
                         "copy_bytes": copied, "export_bytes": written,
                         "ratio": (manifest["count"] / export_s) / (manifest["count"] / copy_s)})
            log.info("run %d: export %.2f s, copy %.2f s, ratio %.3f", r, export_s, copy_s, runs[-1]["ratio"])
    samples = runs[0]["samples"]
    return {
        "export_samples_per_s": statistics.median(r["samples"] / r["export_s"] for r in runs),
        "tar_copy_samples_per_s": statistics.median(r["samples"] / r["copy_s"] for r in runs),
        "export_vs_tar_copy_ratio": statistics.median(r["ratio"] for r in runs),
        "export": {"n": n, "samples": samples, "image_px": size, "dim": dim, "shard_size": shard_size,
                   "workers": workers,
                   "runs": runs, "goal_ratio": 0.5},
    }


PARTS = {"export": bench_export}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.curation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma list of parts: {', '.join(PARTS)}")
    parser.add_argument("--work", default="bench/work/curation", help="cache of generated data")
    parser.add_argument("--n", type=int, default=50_000, help="export: generated samples")
    parser.add_argument("--shard-size", type=int, default=10_000, help="export: samples per shard, in and out")
    parser.add_argument("--dim", type=int, default=128, help="export: embedding dimension (sieve-tiny's by default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print the results instead of writing them")
    args = parser.parse_args(argv)
    setup_logging()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for part in args.only.split(","):
        if part not in PARTS:
            parser.error(f"--only: unknown part {part!r}; parts: {', '.join(PARTS)}")
        if part == "export":
            results.update(bench_export(work, args.n, shard_size=args.shard_size, repeats=args.repeats,
                                        dim=args.dim))
    if args.no_write:
        print(results)
    else:
        print(write_results("curation", results, merge=True))


if __name__ == "__main__":
    main()
