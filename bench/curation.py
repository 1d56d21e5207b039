"""`python -m bench.curation [--only sql,filter] [--work DIR]` → bench/results/curation.json.

- sql: the LAION filter (`curation.filters.render("laion")`, ViT-B/32's threshold) + GROUP BY
  language + count over `--rows` (default 10M) generated metadata rows (`bench.synthetic.
  write_metadata_parts`: LAION-like captions, urls, sizes, scores) in `--parts` (100) Parquet parts: the trusted
  catalog's time (`sql_10m_seconds`, goal ≤ 1 s on 2 cores) and resident memory, and the
  untrusted path's time for the same query (`sql_10m_untrusted_seconds`) and its worker's peak
  memory. Each time is the median of `--repeats` runs after one warm-up run.
- filter: the sieve-tiny similarity filter on generated pairs with 10% swapped captions
  (`pipelines.sample --mismatch-fraction 0.1`, embedded with sieve-tiny). The calibration seed
  re-derives the threshold the way `curation.filters` records it (equal error rate); held-out
  seeds measure the threshold in `curation.filters` (`filter_mismatch_removed`, goal ≥ 0.95;
  `filter_match_kept`, goal ≥ 0.9).

One function per part (`PARTS`); parts merge into the one results file, so each runs alone.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from typing import Any, Callable

import numpy as np

from bench.common import write_results
from bench.synthetic import write_metadata_parts
from curation import filters as F
from curation.catalog import Catalog
from models.runtime import setup_logging
from pipelines.embed import embed
from pipelines.sample import write_sample_dataset

log = logging.getLogger("bench.curation")

#: the query timed by the sql part: LAION's recipe, then a GROUP BY and counts
SQL_QUERY = ("SELECT language, count(*) AS n, avg(clip_similarity) AS mean_similarity FROM samples "
             "WHERE {where} GROUP BY language ORDER BY n DESC")


def _rss_mb(pid: int | str = "self", field: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float], Any]:
    """(median seconds, every run's seconds, last result) after one untimed warm-up run."""
    out = fn()
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs), [round(r, 4) for r in runs], out


def run_sql(work: str, rows: int = 10_000_000, parts: int = 100, repeats: int = 5) -> dict[str, Any]:
    """Trusted and untrusted time of the LAION filter + GROUP BY over `rows` generated metadata rows."""
    root = os.path.join(work, f"metadata-{rows}-{parts}")
    t = time.perf_counter()
    write_metadata_parts(root, rows, parts)
    generate_s = time.perf_counter() - t
    rss_before = _rss_mb()
    with Catalog(root) as cat:
        query = SQL_QUERY.format(where=F.render("laion", clip_model=cat.clip_model))
        trusted_s, trusted_runs, result = _timed(lambda: cat.query(query).table, repeats)
        rss_after = _rss_mb()
    with Catalog(root, untrusted=True, timeout_s=120.0) as cat:
        cat.start()
        untrusted_s, untrusted_runs, same = _timed(lambda: cat.query(query).table, repeats)
        worker_peak = _rss_mb(cat.worker_pid, "VmHWM")
    if same.to_pylist() != result.to_pylist():
        raise RuntimeError("the untrusted path answered the benchmark query differently from the trusted one")
    scale = f"{rows // 1_000_000}m" if rows % 1_000_000 == 0 else str(rows)
    return {
        f"sql_{scale}_seconds": round(trusted_s, 4),
        f"sql_{scale}_untrusted_seconds": round(untrusted_s, 4),
        f"sql_{scale}_untrusted_vs_trusted": round(untrusted_s / trusted_s, 2),
        f"sql_{scale}_catalog_rss_mb": round(rss_after, 1),
        "sql": {"rows": rows, "parts": parts, "query": query, "repeats": repeats, "trusted_runs": trusted_runs,
                "untrusted_runs": untrusted_runs, "generate_seconds": round(generate_s, 1),
                "process_rss_before_catalog_mb": round(rss_before, 1),
                "process_rss_after_queries_mb": round(rss_after, 1),
                "untrusted_worker_peak_rss_mb": round(worker_peak, 1),
                "result": result.to_pylist(),
                "note": "trusted: DuckDB's own Parquet reader in process; untrusted: the sandbox worker "
                        "scanning the same files through a pyarrow dataset (the locked connection has no "
                        "file access), with the takedown filter applied at the scan"},
    }


def _generated(work: str, n: int, seed: int, fraction: float) -> dict[str, np.ndarray]:
    """clip_similarity and the swapped flag of n generated pairs (seed), embedded with sieve-tiny."""
    root = os.path.join(work, f"swapped-{n}-s{seed}-f{fraction}")
    if not os.path.exists(os.path.join(root, "shards", "_complete")):
        write_sample_dataset(os.path.join(root, "shards"), n, size=64, seed=seed, mismatch_fraction=fraction,
                             shard_size=1000)
        open(os.path.join(root, "shards", "_complete"), "w").close()
    embed(os.path.join(root, "shards"), os.path.join(root, "collection"))  # finished parts are skipped
    with Catalog(os.path.join(root, "collection")) as cat:
        table = cat.query("SELECT clip_similarity, mismatched FROM samples WHERE status = 'ok'").table
    return {"similarity": table.column(0).to_numpy(), "mismatched": table.column(1).to_numpy(zero_copy_only=False)}


def equal_error_threshold(matched: np.ndarray, swapped: np.ndarray, step: float = 0.01) -> float:
    """The threshold (on a `step` grid) where the share of matched pairs kept is closest to the
    share of swapped pairs removed: how `curation.filters` calibrated sieve-tiny."""
    grid = np.round(np.arange(-1.0, 1.0 + step, step), 6)
    kept = np.array([(matched >= g).mean() for g in grid])
    removed = np.array([(swapped < g).mean() for g in grid])
    return float(grid[int(np.argmin(np.abs(kept - removed)))])


def _rates(data: dict[str, np.ndarray], threshold: float) -> dict[str, float]:
    sim, swapped = data["similarity"], data["mismatched"].astype(bool)
    return {"mismatch_removed": round(float((sim[swapped] < threshold).mean()), 4),
            "match_kept": round(float((sim[~swapped] >= threshold).mean()), 4)}


def run_filter(work: str, n: int = 3000, fraction: float = 0.1, calibration_seed: int = 1,
               eval_seeds: tuple[int, ...] = (2, 3)) -> dict[str, Any]:
    """Re-derive sieve-tiny's threshold on one seed and measure the recorded one on held-out seeds."""
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
            "clip_model": "sieve-tiny", "threshold": recorded, "samples_per_seed": n, "mismatch_fraction": fraction,
            "eval_seeds": list(eval_seeds), "per_seed": {str(s): _rates(h, recorded) for s, h in zip(eval_seeds, held)},
            "calibration": {"seed": calibration_seed, "rule": "equal error rate on a 0.01 grid",
                            "threshold": derived, "at_derived_threshold_on_eval": _rates(pooled, derived)},
        },
    }


PARTS: dict[str, Callable[..., dict[str, Any]]] = {"sql": run_sql, "filter": run_filter}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.curation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(PARTS), help=f"comma list of parts: {','.join(PARTS)}")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "sieve-bench-curation"),
                   help="generated data, reused across runs")
    p.add_argument("--rows", type=int, default=10_000_000, help="sql: metadata rows")
    p.add_argument("--parts", type=int, default=100, help="sql: Parquet parts")
    p.add_argument("--repeats", type=int, default=5, help="sql: timed runs per path (median reported)")
    p.add_argument("--filter-n", type=int, default=3000, help="filter: generated pairs per seed")
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
    for name in only:
        if name not in ("sql", "filter"):
            payload.update(PARTS[name](a.work))
    path = write_results("curation", payload, merge=True)
    print(path.read_text())


if __name__ == "__main__":
    main()
