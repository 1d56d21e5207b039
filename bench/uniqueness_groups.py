"""Bounded designs for uniqueness against the exact k nearest neighbours over the whole collection.

    python -m bench.uniqueness_groups COLLECTION [--group-size 10000] [--queries 2000] [--k 10]
    python -m bench.uniqueness_groups COLLECTION --lists 1,2,4,8,16 [--queries 2000] [--k 10]

Without --lists (key `1m` or `small`): each row's k nearest neighbours searched only among the
rows of its k-means cluster group (as the semantic dedup level groups them): for `--queries`
random rows, how often the group's k-th neighbour is the collection's, the error of the k-th
distance, the rank correlation of the k-th distances (uniqueness is their rank); and the seconds
one group's exhaustive self-search takes, per row.

With --lists (key `lists_1m`, `lists_4m`, ... by millions of rows, or `lists_small`; `_no_index`
appended for a collection without an index, whose lists are the default k-means ones):
`curation.uniqueness` run whole by lists with each m of --lists neighbour lists (2 Dask workers),
and the `index` method's search on the sampled rows alone (its whole-collection seconds
projected from theirs): per method, the fraction of sampled rows whose k-th distance is the exact
one within 1e-3, the Spearman correlation of their uniqueness with the exact k-th distance, and
seconds.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import faiss
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from scipy.stats import spearmanr

from bench.common import write_results
from collection import schema as S
from collection.storage import read_json
from curation.semdedup import SemanticParams, assign, kmeans
from curation.uniqueness import compute_uniqueness
from curation.vectors import (
    check_index,
    matching_index,
    open_store,
    read_rows,
    search_batch,
    search_depth,
)

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


#: a synthetic "1M" collection holds about 980k embedded rows (the rest failed, as in LAION)
MILLION = 900_000
#: a k-th distance this close to the exact one counts as the same
KTH_ATOL = 1e-3
#: Dask workers of each whole run (the box has 2 cores)
WORKERS = 2


def exact_kth(store: Any, q_ids: np.ndarray, k: int) -> np.ndarray:
    """1 - the cosine to each queried row's k-th nearest other row, over the whole store."""
    q = read_rows(store, q_ids)
    best = np.full((len(q_ids), k), -np.inf, np.float32)
    for lo in range(0, store.count, BATCH):
        ids = np.arange(lo, min(store.count, lo + BATCH))
        sims = q @ read_rows(store, ids).T
        sims[q_ids[:, None] == ids[None, :]] = -np.inf
        both = np.concatenate([best, sims], axis=1)
        best = np.take_along_axis(both, np.argpartition(-both, k - 1, axis=1)[:, :k], axis=1)
    best = -np.sort(-best, axis=1)
    return np.maximum(1.0 - best[:, k - 1], 0.0)


def _agreement(kth: np.ndarray, uniqueness: np.ndarray, exact: np.ndarray) -> dict[str, Any]:
    return {
        "kth_same_as_exact": round(float(np.mean(np.isclose(kth, exact, atol=KTH_ATOL))), 4),
        "kth_distance_error_p95": round(float(np.nanquantile(kth - exact, 0.95)), 5),
        "uniqueness_spearman": round(float(spearmanr(uniqueness, exact)[0]), 4),
    }


def measure_lists(
    collection: str, ms: list[int], queries: int, k: int, seed: int, save: Any = print
) -> dict:
    """The index method, then the lists method at each m, against the exact k-th distances;
    `save(doc)` after each (a whole run at 1M takes minutes)."""
    store = open_store(collection)
    n = store.count
    q_ids = np.sort(np.random.default_rng(seed).choice(n, size=min(n, queries), replace=False))
    t0 = time.perf_counter()
    exact = exact_kth(store, q_ids, k)
    doc: dict[str, Any] = {
        "rows": n,
        "dim": store.dim,
        "k": k,
        "queries": len(q_ids),
        "exact_seconds_for_queries": round(time.perf_counter() - t0, 1),
        "kth_atol": KTH_ATOL,
        "workers": WORKERS,
    }
    if read_json(S.CollectionLayout(collection).index_json(S.MODALITY_IMAGE)) is None:
        doc["index"] = {"skipped": "the collection has no image index"}
    else:
        doc["index"] = _index_method(collection, store, q_ids, k, exact)
    save(doc)
    path = S.InsightLayout(collection).uniqueness
    for m in ms:
        t0 = time.perf_counter()
        report = compute_uniqueness(collection, k, workers=WORKERS, neighbour_lists=m)
        seconds = time.perf_counter() - t0
        table = pq.read_table(path, columns=[S.ID, S.KTH_DISTANCE, S.UNIQUENESS])
        table = table.filter(pc.is_in(table.column(S.ID), value_set=pc.cast(q_ids, "int64")))
        table = table.sort_by(S.ID)
        kth = table.column(S.KTH_DISTANCE).to_numpy()
        doc[f"lists_m{m}"] = {
            "neighbour_lists": m,
            "lists": report["lists"],
            "centroids": report["centroids"],
            "seconds": round(seconds, 1),
            "nan_kth": int(np.isnan(kth).sum()),
            **_agreement(kth, table.column(S.UNIQUENESS).to_numpy(), exact),
        }
        save(doc)
    return doc


def _index_method(
    collection: str, store: Any, q_ids: np.ndarray, k: int, exact: np.ndarray
) -> dict[str, Any]:
    """The index method's k-th distances of the sampled rows (as its part tasks search them) and
    its seconds, projected to the whole collection; its uniqueness is their rank in the sample,
    which is what the Spearman correlation compares anyway."""
    index, doc = matching_index(collection, store)
    depth = search_depth(check_index(collection, S.MODALITY_IMAGE, store.count), store.count, k)
    q = read_rows(store, q_ids)
    t0 = time.perf_counter()
    # one batch, as a part task searches; ids below 0 keep each row's own id among the results
    ids, sims = search_batch(index, store, q, -(2**40), depth + 1, k + 1)
    own = ids == q_ids[:, None]
    sims = np.where(own.any(axis=1)[:, None], np.where(own, np.inf, sims), sims)
    sims = -np.sort(-np.where(np.isnan(sims), -np.inf, sims), axis=1)  # own first, then nearest
    kth = np.where(own.any(axis=1), sims[:, k], sims[:, k - 1])
    kth = np.where(np.isfinite(kth), np.maximum(1.0 - kth, 0.0), np.nan).astype(np.float32)
    seconds = time.perf_counter() - t0
    return {
        "index_key": doc.get("index_key") or doc.get("key"),
        "params": doc.get("params"),
        "search_depth": depth,
        "seconds_for_queries": round(seconds, 1),
        "seconds_projected": round(seconds / len(q_ids) * store.count, 1),
        **_agreement(kth, kth, exact),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.uniqueness_groups", description=__doc__)
    p.add_argument("collection")
    p.add_argument("--group-size", type=int, default=10_000)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lists", default=None, help="comma-separated m: measure the lists method")
    a = p.parse_args(argv)
    rest = (a.queries, a.k, a.seed)
    if a.lists:

        def save(doc: dict[str, Any]) -> None:
            # one key per size in millions, rounded down: the cap on candidates binds with size
            size = doc["rows"] // MILLION
            key = f"lists_{size}m" if size else "lists_small"
            # without an index the lists are the default k-means ones: a key of their own
            key += "_no_index" if "skipped" in doc.get("index", {}) else ""
            print(write_results("uniqueness_groups", {key: doc}, True), doc, flush=True)

        measure_lists(a.collection, [int(m) for m in a.lists.split(",") if m], *rest, save)
        return
    doc = measure(a.collection, a.group_size, *rest)
    key = "1m" if doc["rows"] >= MILLION else "small"
    print(write_results("uniqueness_groups", {key: doc}, True), flush=True)


if __name__ == "__main__":
    main()
