"""The map's placement of unsampled rows: IVF over the sample against exhaustive search.

    python -m bench.map_place COLLECTION [--sample 100000] [--rows 50000] [--nprobe 2,4,8,16]
                              [--layout-cache FILE.npz] [--label 1m]

Draws the sample as `curation.map` does, lays it out with UMAP, fits the IVF lists
`curation.map_job` fits, then places `--rows` unsampled rows by exhaustive search of the whole
sample (what every row cost before) and through the IVF index at each `--nprobe`, batch by batch
in turn so every method sees the same load. Writes bench/results/map_place.json under `--label`:
microseconds per placed row and the projection to all unsampled rows for each method, and
agreement with the exhaustive placement: the fraction of rows placed within 1% of the layout's
extent, and the overlap of the 5 sampled neighbours.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import faiss
import numpy as np

from bench.common import write_results
from curation.map import MAP_SAMPLE
from curation.map_job import (
    PLACE_NEIGHBOURS,
    PLACE_NPROBE,
    fit_centroids,
    layout,
    place_index,
    place_lists,
    place_with,
)
from curation.vectors import open_store, read_rows

#: a placement agrees when it lies within this fraction of the layout's extent of the exact one
TOLERANCE = 0.01
#: rows placed per batch
BATCH = 10_000


def _layout(sample_ids: np.ndarray, sample_x: np.ndarray, seed: int, cache: str | None):
    """(xy, seconds): the UMAP layout, reused from `cache` when it holds these sample ids."""
    if cache and os.path.exists(cache):
        data = np.load(cache)
        if np.array_equal(data["sample_ids"], sample_ids):
            return data["xy"], float(data["seconds"])
    t0 = time.perf_counter()
    xy, _ = layout(sample_x, seed)
    seconds = time.perf_counter() - t0
    if cache:
        np.savez(cache, sample_ids=sample_ids, xy=xy, seconds=seconds)
    return xy, seconds


def measure(
    collection: str, sample: int, rows: int, nprobes: list[int], seed: int, cache: str | None
) -> dict[str, Any]:
    store = open_store(collection)
    n = store.count
    rng = np.random.default_rng(seed)
    sample_ids = np.sort(rng.choice(n, size=min(n, sample), replace=False))
    sample_x = read_rows(store, sample_ids)
    xy, layout_s = _layout(sample_ids, sample_x, seed, cache)
    t0 = time.perf_counter()
    lists = fit_centroids(sample_x, place_lists(len(sample_ids)) or 1, seed)
    lists_s = time.perf_counter() - t0
    rest = np.setdiff1d(np.arange(n), sample_ids)
    ids = np.sort(rng.choice(rest, size=min(rows, len(rest)), replace=False))
    flat = place_index(sample_x, lists[:0])
    ivf = {p: place_index(sample_x, lists, p) for p in nprobes}
    seconds = {"exact": 0.0, **{p: 0.0 for p in nprobes}}
    placed: dict[Any, list[np.ndarray]] = {m: [] for m in seconds}
    overlap: dict[int, list[float]] = {p: [] for p in nprobes}
    for lo in range(0, len(ids), BATCH):
        x = read_rows(store, ids[lo : lo + BATCH])
        for method, index in (("exact", flat), *ivf.items()):
            t0 = time.perf_counter()
            placed[method].append(place_with(index, xy, x, PLACE_NEIGHBOURS))
            seconds[method] += time.perf_counter() - t0
        exact_nn = flat.search(x, PLACE_NEIGHBOURS)[1]
        for p, index in ivf.items():
            nn = index.search(x, PLACE_NEIGHBOURS)[1]
            overlap[p] += [len(set(a) & set(b)) / PLACE_NEIGHBOURS for a, b in zip(nn, exact_nn)]
    want = np.concatenate(placed["exact"])
    extent = float(np.max(xy.max(axis=0) - xy.min(axis=0)))
    unsampled = n - len(sample_ids)

    def cost(method: Any) -> dict[str, float]:
        per_row = seconds[method] / len(ids)
        return {
            "us_per_row": round(per_row * 1e6, 1),
            "seconds_all_unsampled": round(per_row * unsampled, 1),
        }

    methods: dict[str, Any] = {"exact": cost("exact")}
    for p in nprobes:
        dist = np.linalg.norm(np.concatenate(placed[p]) - want, axis=1)
        methods[f"ivf_nprobe{p}"] = {
            **cost(p),
            "speedup_vs_exact": round(seconds["exact"] / max(seconds[p], 1e-9), 2),
            "within_tolerance": round(float(np.mean(dist <= TOLERANCE * extent)), 4),
            "p99_distance_over_extent": round(float(np.quantile(dist, 0.99)) / extent, 6),
            "neighbour_overlap_mean": round(float(np.mean(overlap[p])), 4),
        }
    return {
        "rows": n,
        "sample": len(sample_ids),
        "dim": int(sample_x.shape[1]),
        "place_lists": int(len(lists)),
        "nprobe_default": PLACE_NPROBE,
        "neighbours": PLACE_NEIGHBOURS,
        "faiss_threads": faiss.omp_get_max_threads(),
        "layout_seconds": round(layout_s, 1),
        "lists_fit_seconds": round(lists_s, 1),
        "rows_placed": int(len(ids)),
        "unsampled_rows": int(unsampled),
        "tolerance": f"{TOLERANCE:g} of the layout's extent ({TOLERANCE * extent:.4f})",
        "methods": methods,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.map_place",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("collection")
    p.add_argument("--sample", type=int, default=MAP_SAMPLE)
    p.add_argument("--rows", type=int, default=50_000, help="unsampled rows placed by each method")
    p.add_argument("--nprobe", default="2,4,8,16", help="IVF lists probed, comma-separated")
    p.add_argument("--layout-cache", default=None, help="npz reusing the UMAP layout across runs")
    p.add_argument("--label", default="1m", help="the key of this collection's figures")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    nprobes = [int(v) for v in a.nprobe.split(",")]
    doc = measure(a.collection, a.sample, a.rows, nprobes, a.seed, a.layout_cache)
    print(write_results("map_place", {a.label: doc}, True))


if __name__ == "__main__":
    main()
