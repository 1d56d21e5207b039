"""`python -m bench.curation [--only sql,filter,export] [--work DIR]` → bench/results/curation.json.

- sql: the LAION filter (`curation.filters.render("laion")`, ViT-B/32's threshold) + GROUP BY
  language + count over `--rows` (default 10M) generated metadata rows (`bench.synthetic.
  write_metadata_parts`: LAION-like captions, urls, sizes, scores) in `--parts` (100) Parquet parts:
  the trusted catalog's time (`sql_10m_seconds`, goal ≤ 1 s on 2 cores) and resident memory, and the
  untrusted path's time for the same query (`sql_10m_untrusted_seconds`) and its worker's peak
  memory. Each time is the median of `--repeats` runs after one warm-up run.
- filter: the sieve-tiny similarity filter on generated pairs with 10% swapped captions
  (`pipelines.generate --mismatch-fraction 0.1`, embedded with sieve-tiny). The calibration seed
  re-derives the threshold the way `curation.filters` records it (equal error rate); held-out
  seeds measure the threshold in `curation.filters` (`filter_mismatch_removed`, goal ≥ 0.95;
  `filter_match_kept`, goal ≥ 0.9).
- export: `curation.export` of `--export-n` (50k) generated samples (no resize, webdataset with
  both embeddings) against a plain copy of the same source tars, both on the same Dask
  LocalCluster (one worker per core), alternated `--export-repeats` times after one warm-up
  export: `export_samples_per_s`, `export_vs_tar_copy_ratio` (median of the side-by-side
  ratios; goal ≥ 0.5). The collection is the generated shards with the rows the embed job
  records (byte offsets included) and random CLIP-shaped vectors of sieve-tiny's dimension
  (`bench.synthetic.collection_from_shards`), so the figure is the export's own cost, not CLIP's.

One function per part (`PARTS`); parts merge into the one results file, so each runs alone.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench.common import rss_mb, write_results
from bench.synthetic import collection_from_shards, write_metadata_parts
from collection.cluster import SINGLE_THREAD_WORKER_ENV, open_cluster
from collection.shards import list_shards
from collection.storage import atomic_path
from curation import filters as F
from curation.catalog import Catalog
from curation.export import export
from models.runtime import cores, setup_logging
from pipelines.embed import embed
from pipelines.generate import write_sample_dataset

log = logging.getLogger("bench.curation")

#: the query timed by the sql part: LAION's recipe, then a GROUP BY and counts
SQL_QUERY = (
    "SELECT language, count(*) AS n, avg(clip_similarity) AS mean_similarity FROM samples "
    "WHERE {where} GROUP BY language ORDER BY n DESC"
)


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float], Any]:
    """(median seconds, every run's seconds, last result) after one untimed warm-up run."""
    out = fn()
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs), [round(r, 4) for r in runs], out


def run_sql(
    work: str, rows: int = 10_000_000, parts: int = 100, repeats: int = 5
) -> dict[str, Any]:
    """Trusted and untrusted time of the LAION filter + GROUP BY over
    `rows` generated metadata rows."""
    root = os.path.join(work, f"metadata-{rows}-{parts}")
    t = time.perf_counter()
    write_metadata_parts(root, rows, parts)
    generate_s = time.perf_counter() - t
    rss_before = rss_mb()
    with Catalog(root) as cat:
        query = SQL_QUERY.format(where=F.render("laion", clip_model=cat.clip_model))
        trusted_s, trusted_runs, result = _timed(lambda: cat.query(query).table, repeats)
        rss_after = rss_mb()
    with Catalog(root, untrusted=True, timeout_s=120.0) as cat:
        cat.start()
        untrusted_s, untrusted_runs, same = _timed(lambda: cat.query(query).table, repeats)
        worker_peak = rss_mb(cat.worker_pid, "VmHWM")
    if same.to_pylist() != result.to_pylist():
        raise RuntimeError(
            "the untrusted path answered the benchmark query differently from the trusted one"
        )
    scale = f"{rows // 1_000_000}m" if rows % 1_000_000 == 0 else str(rows)
    return {
        f"sql_{scale}_seconds": round(trusted_s, 4),
        f"sql_{scale}_untrusted_seconds": round(untrusted_s, 4),
        f"sql_{scale}_untrusted_vs_trusted": round(untrusted_s / trusted_s, 2),
        f"sql_{scale}_catalog_rss_mb": round(rss_after, 1),
        "sql": {
            "rows": rows,
            "parts": parts,
            "query": query,
            "repeats": repeats,
            "trusted_runs": trusted_runs,
            "untrusted_runs": untrusted_runs,
            "generate_seconds": round(generate_s, 1),
            "process_rss_before_catalog_mb": round(rss_before, 1),
            "process_rss_after_queries_mb": round(rss_after, 1),
            "untrusted_worker_peak_rss_mb": round(worker_peak, 1),
            "result": result.to_pylist(),
            "note": "trusted: DuckDB's own Parquet reader in process; "
            "untrusted: the sandbox worker "
            "scanning the same files through a pyarrow dataset (the locked connection has no "
            "file access), with the takedown filter applied at the scan",
        },
    }


def _generated(work: str, n: int, seed: int, fraction: float) -> dict[str, np.ndarray]:
    """clip_similarity and the swapped flag of n generated pairs (seed),
    embedded with sieve-tiny."""
    root = os.path.join(work, f"swapped-{n}-s{seed}-f{fraction}")
    if not os.path.exists(os.path.join(root, "shards", "_complete")):
        write_sample_dataset(
            os.path.join(root, "shards"),
            n,
            size=64,
            seed=seed,
            mismatch_fraction=fraction,
            shard_size=1000,
        )
        open(os.path.join(root, "shards", "_complete"), "w").close()
    # finished parts are skipped
    embed(os.path.join(root, "shards"), os.path.join(root, "collection"))
    with Catalog(os.path.join(root, "collection")) as cat:
        table = cat.query(
            "SELECT clip_similarity, mismatched FROM samples WHERE status = 'ok'"
        ).table
    return {
        "similarity": table.column(0).to_numpy(),
        "mismatched": table.column(1).to_numpy(zero_copy_only=False),
    }


def equal_error_threshold(matched: np.ndarray, swapped: np.ndarray, step: float = 0.01) -> float:
    """The threshold (on a `step` grid) where the share of matched pairs kept is closest to the
    share of swapped pairs removed: how `curation.filters` calibrated sieve-tiny."""
    grid = np.round(np.arange(-1.0, 1.0 + step, step), 6)
    kept = np.array([(matched >= g).mean() for g in grid])
    removed = np.array([(swapped < g).mean() for g in grid])
    return float(grid[int(np.argmin(np.abs(kept - removed)))])


def _rates(data: dict[str, np.ndarray], threshold: float) -> dict[str, float]:
    sim, swapped = data["similarity"], data["mismatched"].astype(bool)
    return {
        "mismatch_removed": round(float((sim[swapped] < threshold).mean()), 4),
        "match_kept": round(float((sim[~swapped] >= threshold).mean()), 4),
    }


def run_filter(
    work: str,
    n: int = 3000,
    fraction: float = 0.1,
    calibration_seed: int = 1,
    eval_seeds: tuple[int, ...] = (2, 3),
) -> dict[str, Any]:
    """Re-derive sieve-tiny's threshold on one seed and measure the
    recorded one on held-out seeds."""
    calib = _generated(work, n, calibration_seed, fraction)
    sim, swapped = calib["similarity"], calib["mismatched"].astype(bool)
    derived = equal_error_threshold(sim[~swapped], sim[swapped])
    held = [_generated(work, n, s, fraction) for s in eval_seeds]
    pooled = {k: np.concatenate([h[k] for h in held]) for k in ("similarity", "mismatched")}
    recorded = F.similarity_threshold("sieve-tiny")
    rates = _rates(pooled, recorded)
    return {
        "filter_mismatch_removed": rates["mismatch_removed"],
        "filter_match_kept": rates["match_kept"],
        "filter": {
            "clip_model": "sieve-tiny",
            "threshold": recorded,
            "samples_per_seed": n,
            "mismatch_fraction": fraction,
            "eval_seeds": list(eval_seeds),
            "per_seed": {str(s): _rates(h, recorded) for s, h in zip(eval_seeds, held)},
            "calibration": {
                "seed": calibration_seed,
                "rule": "equal error rate on a 0.01 grid",
                "threshold": derived,
                "at_derived_threshold_on_eval": _rates(pooled, derived),
            },
        },
    }


def copy_file(src: str, dst: str) -> int:
    """The export's baseline: read a source tar and write it elsewhere, as plainly as Python can."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
    return os.path.getsize(dst)


def _export_data(
    work: Path, n: int, shard_size: int, dim: int, size: int = 64
) -> tuple[str, list[str]]:
    """(collection, source tars) of n generated samples under `work`, reused when already there."""
    shards = work / f"export-shards-{n}-{size}-{shard_size}"
    coll = work / f"export-coll-{n}-{size}-{shard_size}-{dim}"
    if not (shards / "_complete").exists():
        write_sample_dataset(shards, n, size=size, shard_size=shard_size, watermark_fraction=0.0)
        (shards / "_complete").write_text("")
    if not (coll / "collection.json").exists():
        with atomic_path(coll) as tmp:
            collection_from_shards(str(shards), tmp, dim=dim)
    return str(coll), [s.url for s in list_shards(str(shards))]


def run_export(
    work: str, n: int = 50_000, shard_size: int = 10_000, dim: int = 128, repeats: int = 3
) -> dict[str, Any]:
    """Export vs a plain copy of the source tars, side by side on one LocalCluster."""
    root = Path(work)
    coll, tars = _export_data(root, n, shard_size, dim)
    workers = cores()
    spec = {"name": "everything", "where": "true"}
    runs = []
    # the cluster the export starts for itself when given none
    with open_cluster(workers=workers, worker_env=SINGLE_THREAD_WORKER_ENV) as cluster:
        client = cluster.client
        export(
            coll,
            spec,
            str(root / "export-warm-up"),
            shard_size=shard_size,
            overwrite=True,
            client=client,
        )
        for r in range(repeats):
            out, copy = root / "export-out", root / "export-copy"
            for d in (out, copy):
                shutil.rmtree(d, ignore_errors=True)
            copy.mkdir(parents=True)
            t = time.perf_counter()
            copied = sum(
                client.gather(
                    client.map(
                        copy_file, tars, [str(copy / Path(x).name) for x in tars], pure=False
                    )
                )
            )
            copy_s = time.perf_counter() - t
            t = time.perf_counter()
            manifest = export(coll, spec, str(out), shard_size=shard_size, client=client)
            export_s = time.perf_counter() - t
            runs.append(
                {
                    "copy_s": round(copy_s, 4),
                    "export_s": round(export_s, 4),
                    "samples": manifest["count"],
                    "copy_bytes": copied,
                    "export_bytes": sum(p.stat().st_size for p in out.glob("*.tar")),
                    "ratio": round(copy_s / export_s, 4),
                }
            )
            log.info(
                "export run %d: export %.2f s, copy %.2f s, ratio %.3f",
                r,
                export_s,
                copy_s,
                runs[-1]["ratio"],
            )
    samples = runs[0]["samples"]
    return {
        "export_samples_per_s": round(statistics.median(samples / r["export_s"] for r in runs), 1),
        "export_vs_tar_copy_ratio": round(statistics.median(r["ratio"] for r in runs), 4),
        "export": {
            "n": n,
            "samples": samples,
            "image_px": 64,
            "dim": dim,
            "shard_size": shard_size,
            "workers": workers,
            "repeats": repeats,
            "runs": runs,
            "tar_copy_samples_per_s": round(
                statistics.median(samples / r["copy_s"] for r in runs), 1
            ),
            "note": "the same samples per second, "
            "so the ratio is copy seconds / export seconds; the "
            "export writes more bytes than it reads (tar headers of five members per sample, "
            "two .npy embeddings, a longer json)",
        },
    }


PARTS: dict[str, Callable[..., dict[str, Any]]] = {
    "sql": run_sql,
    "filter": run_filter,
    "export": run_export,
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.curation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--only", default=",".join(PARTS), help=f"comma list of parts: {','.join(PARTS)}"
    )
    p.add_argument(
        "--work",
        default=os.path.join(tempfile.gettempdir(), "sieve-bench-curation"),
        help="generated data, reused across runs",
    )
    p.add_argument("--rows", type=int, default=10_000_000, help="sql: metadata rows")
    p.add_argument("--parts", type=int, default=100, help="sql: Parquet parts")
    p.add_argument(
        "--repeats", type=int, default=5, help="sql: timed runs per path (median reported)"
    )
    p.add_argument("--filter-n", type=int, default=3000, help="filter: generated pairs per seed")
    p.add_argument("--export-n", type=int, default=50_000, help="export: generated samples")
    p.add_argument(
        "--export-shard-size",
        type=int,
        default=10_000,
        help="export: samples per shard, in and out",
    )
    p.add_argument(
        "--export-repeats", type=int, default=3, help="export: side-by-side runs (median reported)"
    )
    a = p.parse_args(argv)
    setup_logging()
    only = [x.strip() for x in a.only.split(",") if x.strip()]
    unknown = sorted(set(only) - set(PARTS))
    if unknown:
        p.error(f"--only: unknown part(s) {unknown}; known: {sorted(PARTS)}")
    os.makedirs(a.work, exist_ok=True)
    payload: dict[str, Any] = {}
    if "sql" in only:
        payload.update(run_sql(a.work, a.rows, a.parts, a.repeats))
    if "filter" in only:
        payload.update(run_filter(a.work, a.filter_n))
    if "export" in only:
        payload.update(
            run_export(a.work, a.export_n, a.export_shard_size, repeats=a.export_repeats)
        )
    for name in only:
        if name not in ("sql", "filter", "export"):
            payload.update(PARTS[name](a.work))
    path = write_results("curation", payload, merge=True)
    print(path.read_text())


if __name__ == "__main__":
    main()
