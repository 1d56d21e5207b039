"""How rare each sample is: the cosine distance to its k-th nearest neighbour, found through the
collection's index, stored as a column table SQL can join (`uniqueness.parquet`).

    python -m curation.uniqueness COLLECTION [--k 10] [--modality image]

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
from collection.storage import write_json
from curation.vectors import neighbours, open_store, read_keys, read_table, write_table
from models.runtime import setup_logging

log = logging.getLogger(__name__)

DEFAULT_K = 10


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
    collection: str, k: int = DEFAULT_K, modality: str = S.MODALITY_IMAGE
) -> dict[str, Any]:
    """Compute and write uniqueness.parquet; return a small report."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    started = time.time()
    store = open_store(collection, modality)
    keys = read_keys(collection)  # before the search: a missing part fails at once
    _, sims = neighbours(collection, k, modality, store)
    kth = np.maximum(1.0 - sims[:, k - 1], 0.0).astype(
        np.float32
    )  # float16 copies can exceed cosine 1
    score = uniqueness_scores(kth)
    table = pa.table(
        {
            S.KEY: pa.array(list(keys), pa.string()),
            S.ID: pa.array(np.arange(len(keys)), pa.int64()),
            S.UNIQUENESS: pa.array(score, pa.float32()),
            S.KTH_DISTANCE: pa.array(kth, pa.float32()),
        }
    )
    path = S.InsightLayout(collection).uniqueness
    write_table(path, table)
    report = {
        "path": path,
        "samples": len(keys),
        "k": k,
        "modality": modality,
        "median_kth_distance": float(np.nanmedian(kth)) if len(kth) else None,
        "seconds": round(time.time() - started, 3),
    }
    write_json(path.removesuffix(".parquet") + ".json", report)
    log.info(
        "%s: uniqueness of %d samples (k=%d, %s) -> %s", collection, len(keys), k, modality, path
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
    a = p.parse_args(argv)
    setup_logging()
    try:
        print(json.dumps(compute_uniqueness(a.collection, a.k, a.modality)))
    except (ValueError, FileNotFoundError) as exc:  # bad input: one line, no traceback
        p.error(str(exc))


if __name__ == "__main__":
    main()
