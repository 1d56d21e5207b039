"""A bounded design for uniqueness, measured before it is built: each row's k nearest neighbours
searched only among the rows of its k-means cluster group (as the semantic dedup level groups
them), against the exact k nearest over the whole collection.

    python -m bench.uniqueness_groups COLLECTION [--group-size 10000] [--queries 2000] [--k 10]

Writes bench/results/uniqueness_groups.json: for `--queries` random rows, how often the group's
k-th neighbour is the collection's, the error of the k-th distance, the rank correlation of the
k-th distances (uniqueness is their rank); and the seconds one group's exhaustive self-search
takes, per row (a task's cost, fixed by the group size whatever the collection's size).
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import faiss
import numpy as np
from scipy.stats import spearmanr

from bench.common import write_results
from curation.semdedup import SemanticParams, assign, kmeans
from curation.vectors import open_store, read_rows

#: rows read and assigned per batch
BATCH = 65536


def _knn(base: np.ndarray, base_ids: np.ndarray, q: np.ndarray, q_ids: np.ndarray, k: int):
    """Cosines of each query's k nearest rows of `base` other than itself (NaN where fewer)."""
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    sims, nn = index.search(q, min(k + 1, len(base)))
    own = base_ids[np.maximum(nn, 0)] == q_ids[:, None]
    sims = np.where(own | (nn < 0), -np.inf, sims)
    sims = -np.sort(-sims, axis=1)[:, :k]
    return np.where(np.isfinite(sims), sims, np.nan)


def measure(collection: str, group_size: int, queries: int, k: int, seed: int) -> dict[str, Any]:
    store = open_store(collection)
    n = store.count
    params = SemanticParams(group_size=group_size, seed=seed)
    groups = math.ceil(n / group_size)
    rng = np.random.default_rng(seed)
    train = np.sort(rng.choice(n, size=min(n, groups * params.points_per_centroid), replace=False))
    t0 = time.perf_counter()
    centroids = kmeans(read_rows(store, train), groups, params)
    labels = np.empty(n, np.int64)
    for lo in range(0, n, BATCH):
        labels[lo : lo + BATCH] = assign(
            read_rows(store, np.arange(lo, min(n, lo + BATCH))), centroids
        )
    assign_s = time.perf_counter() - t0
    q_ids = np.sort(rng.choice(n, size=queries, replace=False))
    q = read_rows(store, q_ids)
    # exact: the whole collection, a batch of rows at a time
    best = np.full((queries, k), -np.inf, np.float32)
    t0 = time.perf_counter()
    for lo in range(0, n, BATCH):
        ids = np.arange(lo, min(n, lo + BATCH))
        got = np.nan_to_num(_knn(read_rows(store, ids), ids, q, q_ids, k), nan=-np.inf)
        best = -np.sort(-np.concatenate([best, got], axis=1), axis=1)[:, :k]
    exact_s = time.perf_counter() - t0
    local = np.full((queries, k), np.nan, np.float32)
    own_group = labels[q_ids]
    self_search = None
    for g in np.unique(own_group):
        members = np.nonzero(labels == g)[0]
        x = read_rows(store, members)
        at = own_group == g
        local[at] = _knn(x, members, q[at], q_ids[at], k)
        if self_search is None:  # the task's work: every member's k neighbours in its group
            t0 = time.perf_counter()
            _knn(x, members, x, members, k)
            self_search = (time.perf_counter() - t0, len(members))
    exact_kth, local_kth = 1.0 - best[:, k - 1], 1.0 - local[:, k - 1]
    ok = np.isfinite(local_kth)
    sizes = np.bincount(labels, minlength=groups)
    return {
        "rows": n,
        "dim": int(q.shape[1]),
        "k": k,
        "group_size": group_size,
        "groups": groups,
        "group_rows_max": int(sizes.max()),
        "queries": queries,
        "faiss_threads": faiss.omp_get_max_threads(),
        "assign_seconds": round(assign_s, 1),
        "exact_seconds_for_queries": round(exact_s, 1),
        "kth_same_as_exact": round(float(np.mean(np.isclose(local_kth, exact_kth, atol=1e-6))), 4),
        "kth_distance_rel_error_median": round(
            float(np.median((local_kth[ok] - exact_kth[ok]) / np.maximum(exact_kth[ok], 1e-9))), 5
        ),
        "kth_distance_rel_error_p95": round(
            float(
                np.quantile((local_kth[ok] - exact_kth[ok]) / np.maximum(exact_kth[ok], 1e-9), 0.95)
            ),
            5,
        ),
        "kth_rank_spearman": round(float(spearmanr(local_kth[ok], exact_kth[ok])[0]), 4),
        "fewer_than_k_in_group": int((~ok).sum()),
        "group_self_search_seconds": round(self_search[0], 2),
        "group_self_search_rows": int(self_search[1]),
        "group_self_search_us_per_row": round(self_search[0] / self_search[1] * 1e6, 1),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.uniqueness_groups", description=__doc__)
    p.add_argument("collection")
    p.add_argument("--group-size", type=int, default=10_000)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    doc = measure(a.collection, a.group_size, a.queries, a.k, a.seed)
    key = "1m" if doc["rows"] >= 10**6 else "small"
    print(write_results("uniqueness_groups", {key: doc}, True))


if __name__ == "__main__":
    main()
