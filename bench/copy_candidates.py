"""`python -m bench.copy_candidates [--n 20000 100000] [--work DIR]`
→ bench/results/copy_candidates.json

The copies level's candidate pairs per row as the collection grows, by source, without the
verdicts: on the generated pictures of `bench.scale_copies` (`bench.insight.data`, reused under
--work), the candidate tasks (`curation.dedup_stages.candidate_stage`) run in this process, one
task at a time, and their pair files are counted. The verdicts cost about one pixel check per
pair, so pairs per row is what decides whether the copies level stays linear in N.

Figures per size (`by_rows[n]`): candidate pairs per row by source and all together, each
row's candidate count (p50, p99, max), the phash bands' bucket sizes (the rows sharing a band
value) with the pairs each bucket size gives, the local hashes' sharing, the seconds of each
source's tasks, and the share of the planted copies among the candidates, by source and by
transform (what the bounds must keep).
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import shutil
import time
from typing import Any, Callable

import numpy as np
import pyarrow.parquet as pq

from bench.common import RESULTS_DIR, write_results
from bench.insight import data
from bench.scale_copies import WORK, planted
from collection import schema as S
from collection.parts import read_metadata
from curation import copy_candidates as C, copy_sketch as K
from curation.dedup_stages import candidate_stage
from curation.vectors import open_store
from models.runtime import setup_logging

log = logging.getLogger("bench.copy_candidates")

#: bucket sizes (rows sharing a band value, or a local hash) the figures are split by
BUCKETS = (2, 4, 16, 64, 256, 1024, 4096)


def _pairs(files: list[str], n: int) -> np.ndarray:
    """Distinct pairs (as codes i * n + j) in the pair files."""
    codes = [
        t["i"].to_numpy().astype(np.int64) * n + t["j"].to_numpy()
        for t in (pq.read_table(f, columns=["i", "j"]) for f in files)
    ]
    return np.unique(np.concatenate(codes)) if codes else np.zeros(0, np.int64)


def _per_row(codes: np.ndarray, n: int) -> dict[str, float]:
    """Pairs per row, and each row's candidate count (the pairs it is in)."""
    degree = np.bincount(np.concatenate([codes // n, codes % n]), minlength=n)
    return {
        "pairs": int(len(codes)),
        "pairs_per_row": round(len(codes) / n, 2),
        "row_candidates_p50": float(np.quantile(degree, 0.5)),
        "row_candidates_p99": float(np.quantile(degree, 0.99)),
        "row_candidates_max": int(degree.max()),
    }


def _bucket_label(size: np.ndarray) -> np.ndarray:
    edges = np.array(BUCKETS[1:])
    labels = np.array(
        [f"{lo}-{hi - 1}" for lo, hi in zip(BUCKETS, BUCKETS[1:])] + [f">={BUCKETS[-1]}"]
    )
    return labels[np.searchsorted(edges, size, side="right")]


def _histogram(labels: np.ndarray, weights: np.ndarray | None = None) -> dict[str, int]:
    keys, inverse = np.unique(labels, return_inverse=True)
    sums = np.bincount(inverse, weights=weights, minlength=len(keys))
    return {str(k): int(v) for k, v in zip(keys, sums)}


def band_figures(work: str, files: list[str], n: int) -> dict[str, Any]:
    """Per band: the largest bucket, the comparisons its join makes (sum of c(c-1)/2 over band
    values) and its pairs split by the size of the bucket they came from."""
    phash = pq.read_table(os.path.join(work, "rows.parquet"), columns=["phash"])["phash"]
    known = phash.is_valid().to_numpy(zero_copy_only=False)
    h = phash.fill_null(0).to_numpy().astype(np.uint64)
    out: dict[str, Any] = {"bands": {}, "pairs_by_bucket": {}}
    for b, ((shift, width), f) in enumerate(zip(C.bands(), files)):
        v = ((h >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(np.int64)
        v[~known] = -1 - np.arange(int((~known).sum()))  # unknown hashes share no value
        values, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
        t = pq.read_table(f, columns=["i"])
        size = counts[inverse[t["i"].to_numpy()]]
        by_bucket = _histogram(_bucket_label(size))
        for k, c in by_bucket.items():
            out["pairs_by_bucket"][k] = out["pairs_by_bucket"].get(k, 0) + c
        out["bands"][str(b)] = {
            "largest_bucket": int(counts.max()),
            "comparisons": int((counts * (counts - 1) // 2).sum()),
            "pairs": int(t.num_rows),
        }
    return out


def local_figures(work: str) -> dict[str, Any]:
    """How many pictures share each local hash: hashes and the pairs they would make, by
    sharing (those over C.LOCAL_MAX_SHARED propose none)."""
    files = sorted(glob.glob(os.path.join(work, "sketch-*.parquet")))
    if not files:
        return {}
    h = np.concatenate([pq.read_table(f, columns=["h"])["h"].to_numpy() for f in files])
    _, counts = np.unique(h, return_counts=True)
    shared = counts[counts > 1]
    labels = _bucket_label(shared)
    return {
        "hashes": int(len(counts)),
        "hashes_per_picture": round(len(h) / max(len(files) * C.SKETCH_ROWS, 1), 2),
        "shared_hashes_by_sharing": _histogram(labels),
        "pairs_by_sharing": _histogram(labels, shared * (shared - 1) / 2),
    }


def planted_figures(
    root: np.ndarray, copies: np.ndarray, meta: Any, by_source: dict[str, np.ndarray]
) -> dict[str, Any]:
    """The share of the planted (copy, original) pairs among each source's candidates and all
    of them, overall and by transform."""
    n = len(root)
    lo, hi = np.minimum(copies, root[copies]), np.maximum(copies, root[copies])
    code = lo * n + hi
    transforms = np.array(meta.column("transform").to_pylist(), dtype=object)[copies]
    names = sorted(set(transforms))
    out: dict[str, Any] = {"pairs": int(len(copies))}
    every = np.zeros(len(copies), bool)
    for source, codes in by_source.items():
        among = np.isin(code, codes)
        every |= among
        out[source] = round(float(among.mean()), 4)
    out["among_candidates"] = round(float(every.mean()), 4)
    out["among_candidates_by_transform"] = {
        str(t): round(float(every[transforms == t].mean()), 4) for t in names
    }
    return out


def _timed(seconds: dict[str, float]) -> Callable[[Callable[..., Any], list[tuple]], list[Any]]:
    """A runner doing each task in this process, adding each function's seconds to `seconds`."""

    def run(fn: Callable[..., Any], args: list[tuple]) -> list[Any]:
        t = time.perf_counter()
        out = [fn(*a) for a in args]
        seconds[fn.__name__] = round(seconds.get(fn.__name__, 0.0) + time.perf_counter() - t, 1)
        return out

    return run


def measure(n: int, work: str, copy_fraction: float, workers: int) -> dict[str, Any]:
    """Make (or reuse) the data, run the candidate tasks, count their pairs."""
    collection = data(os.path.join(work, f"n{n}"), n, copy_fraction, workers)
    store = open_store(collection, S.MODALITY_IMAGE)
    meta = read_metadata(
        collection, [S.KEY, S.PHASH, S.SOURCE_SHARD, S.SOURCE_OFFSET, S.SOURCE_SIZE, S.SHA256]
    )
    task_dir = os.path.join(work, f"n{n}", "candidates")
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    _, files = candidate_stage(collection, meta, np.arange(n), store, _timed(seconds), task_dir)
    total = time.perf_counter() - t
    by_source = {source: _pairs(f, n) for source, f in files.items()}
    union = np.unique(np.concatenate(list(by_source.values())))
    root, copies, truth = planted(collection)
    return {
        "rows": n,
        "pairs_per_row": round(len(union) / n, 2),
        "by_source": {s: _per_row(c, n) for s, c in by_source.items()},
        "all_sources": _per_row(union, n),
        "verdict_tasks": -(-len(union) // C.PAIRS_PER_TASK),
        "phash_bands": band_figures(task_dir, files[C.SOURCE_PHASH], n),
        "local_hashes": local_figures(task_dir),
        "planted": planted_figures(root, copies, truth, by_source),
        "seconds": {**seconds, "all": round(total, 1)},
        "settings": {
            "phash_max_distance": C.PHASH_MAX_DISTANCE,
            "phash_per_row": C.PHASH_PER_ROW,
            "phash_max_shared": C.PHASH_MAX_SHARED,
            "neighbours": C.COPY_NEIGHBOURS,
            "min_cosine": C.COPY_MIN_COSINE,
            "local_max_shared": C.LOCAL_MAX_SHARED,
            "local_per_row": C.LOCAL_PER_ROW,
            "keypoints": K.KEYPOINTS,
            "cell_grid": K.CELL_GRID,
            "pairs_per_task": C.PAIRS_PER_TASK,
        },
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.copy_candidates",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--n", type=int, nargs="+", default=[20_000, 100_000], help="sample counts")
    p.add_argument(
        "--work",
        default=WORK,
        help="generated data (one folder per --n, shared with bench.scale_copies) and task files",
    )
    p.add_argument("--copy-fraction", type=float, default=0.05, help="planted copies")
    p.add_argument("--workers", type=int, default=2, help="Dask workers making the data")
    p.add_argument("--keep-work", action="store_true", help="keep the candidate task files")
    a = p.parse_args(argv)
    setup_logging()
    path = RESULTS_DIR / "copy_candidates.json"
    by_rows = json.loads(path.read_text()).get("by_rows", {}) if path.exists() else {}
    for n in a.n:
        by_rows[str(n)] = measure(n, a.work, a.copy_fraction, a.workers)
        if not a.keep_work:
            shutil.rmtree(os.path.join(a.work, f"n{n}", "candidates"), ignore_errors=True)
        log.info("%d rows: %s pairs per row", n, by_rows[str(n)]["pairs_per_row"])
    out = write_results("copy_candidates", {"by_rows": by_rows}, merge=True)
    log.info("%s", out)


if __name__ == "__main__":
    main()
