"""How rare each sample is: the cosine distance to its k-th nearest neighbour, stored as a column
table SQL can join (`uniqueness.parquet`).

    python -m curation.uniqueness COLLECTION [--k 10] [--modality image]
                                  [--method lists|index] [--neighbour-lists M]

The `lists` method (default, `curation.uniqueness_lists`) compares each row exactly, by matrix
products, with the rows of the M inverted lists nearest its own (the index's coarse centroids,
or a k-means on a sample): bounded tasks, linear in the rows for a fixed list size. The `index`
method searches every row through the collection's index (`curation.uniqueness_job`).

Columns: `key`, `id` (the global vector id), `kth_distance` (1 − cosine to the k-th nearest
other sample) and `uniqueness`, the sample's rank by kth_distance scaled to [0, 1] (1: the
rarest; a rank, so it reads the same whatever the model's similarity scale). A planted copy
sits next to its original, so copies score near 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa

from collection import schema as S
from collection.cluster_options import add_cluster_options
from collection.storage import write_json
from curation.uniqueness_job import uniqueness_job
from curation.uniqueness_lists import NEIGHBOUR_LISTS, TASK_ROWS, lists_job
from curation.vectors import read_table
from models.runtime import setup_logging

log = logging.getLogger(__name__)

DEFAULT_K = 10
METHODS = ("lists", "index")


def uniqueness_scores(kth_distance: np.ndarray) -> np.ndarray:
    """Rank of each distance scaled to [0, 1] (ties share their mean rank; NaN counts as the
    rarest)."""
    d = np.where(np.isfinite(kth_distance), kth_distance, np.inf)
    n = len(d)
    if n < 2:
        return np.ones(n, np.float32)
    order = np.argsort(d, kind="stable")
    ranks = np.empty(n, np.float64)
    ranks[order] = np.arange(n)
    _, inverse, counts = np.unique(d, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums[inverse] / counts[inverse] / (n - 1)).astype(np.float32)


def compute_uniqueness(
    collection: str,
    k: int = DEFAULT_K,
    modality: str = S.MODALITY_IMAGE,
    scheduler: str | None = None,
    workers: int | None = None,
    method: str = "lists",
    neighbour_lists: int = NEIGHBOUR_LISTS,
    task_rows: int = TASK_ROWS,
) -> dict[str, Any]:
    """Compute and write uniqueness.parquet by `method` (module doc) in Dask tasks: a
    LocalCluster of `workers` processes, the cluster at `scheduler`, or with `workers=0` this
    process; return a small report."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if method not in METHODS:
        raise ValueError(f"method: unknown {method!r}; expected one of {list(METHODS)}")
    started = time.time()
    path = S.InsightLayout(collection).uniqueness
    if method == "index":
        done = uniqueness_job(collection, k, modality, path, scheduler, workers)
    else:
        done = lists_job(
            collection, k, modality, path, scheduler, workers, neighbour_lists, task_rows
        )
    shown = ("lists", "centroids", "neighbour_lists", "candidates_per_row", "task_cpu_seconds")
    extra = {n: done[n] for n in shown if n in done}
    report = {
        "path": path,
        "samples": done["samples"],
        "k": k,
        "modality": modality,
        "method": method,
        **extra,
        "median_kth_distance": done["median_kth_distance"],
        "tasks": done["tasks"],
        "tasks_run": done["tasks_run"],
        "seconds": round(time.time() - started, 3),
    }
    write_json(path.removesuffix(".parquet") + ".json", report)
    log.info(
        "%s: uniqueness of %d samples (k=%d, %s) -> %s",
        collection,
        done["samples"],
        k,
        modality,
        path,
    )
    return report


def read_uniqueness(collection: str) -> pa.Table:
    """uniqueness.parquet (FileNotFoundError naming the command that writes it)."""
    return read_table(
        S.InsightLayout(collection).uniqueness,
        f"uniqueness table; run `python -m curation.uniqueness {collection}`",
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m curation.uniqueness",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("collection")
    p.add_argument(
        "--k", type=int, default=DEFAULT_K, help="which neighbour's distance measures rarity"
    )
    p.add_argument("--modality", default=S.MODALITY_IMAGE, choices=S.MODALITIES)
    p.add_argument("--method", default="lists", choices=METHODS, help="see above")
    p.add_argument(
        "--neighbour-lists",
        type=int,
        default=NEIGHBOUR_LISTS,
        metavar="M",
        help=f"lists method: lists each row is compared with, its own included "
        f"(default {NEIGHBOUR_LISTS})",
    )
    add_cluster_options(p)
    a = p.parse_args(argv)
    setup_logging()
    try:
        print(
            json.dumps(
                compute_uniqueness(
                    a.collection,
                    a.k,
                    a.modality,
                    a.scheduler,
                    a.workers,
                    a.method,
                    a.neighbour_lists,
                )
            )
        )
    except (ValueError, FileNotFoundError) as exc:  # bad input: one line, no traceback
        p.error(str(exc))


if __name__ == "__main__":
    main()
