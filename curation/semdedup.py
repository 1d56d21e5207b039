"""SemDeDup (Abbas et al. 2023) at collection scale: spherical k-means, then pairwise cosine
inside each cluster.

The ε convention (SemDeDup's code, `M > 1 - eps`): ε is a cosine distance. Inside a cluster
the members are ordered by the keep rule (most preferred first); a member is removed when its
largest cosine similarity to a member before it exceeds 1 − ε. Larger ε removes more. (The
SemDeDup README says "lower epsilon will cause more aggressive pruning", the opposite of what
its code does; we follow the code.)

Scale: a member's largest similarity to earlier members does not depend on ε, so it is
computed once (`group_links`) and any ε is a threshold on it. Clusters are made in two
steps so the cost stays close to linear in the number of vectors: the driver splits the
collection into cluster groups of about `group_size` vectors (one k-means on a sample,
`root_groups`); each group is one task (a Dask task in `curation.dedup`) that splits its
vectors recursively into leaves of about `leaf_size` (k-means with at most `branch`
centroids per split) and compares the members of each leaf pairwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from collection.embeddings import EmbeddingStore

#: ε values whose removed fractions every semantic run reports (a cheap table: one pass gives all)
EPS_TABLE: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3)


@dataclass(frozen=True)
class SemanticParams:
    """Cluster sizes of the two-step clustering (see the module doc)."""

    group_size: int = 50_000
    leaf_size: int = 1000
    branch: int = 16
    niter: int = 20
    seed: int = 0
    #: vectors per k-means centroid used for training (faiss subsamples to this)
    points_per_centroid: int = 256


class ArrayVectors:
    """An in-memory (or np.memmap) array with EmbeddingStore's `gather`,
    for benchmarks and tests."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    @property
    def count(self) -> int:
        return int(self.array.shape[0])

    def gather(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        order = np.argsort(ids)
        out = np.empty((len(ids), self.array.shape[1]), np.float32)
        out[order] = self.array[ids[order]]
        return out


def open_vectors(source: Any) -> Any:
    """Vectors to gather from: (collection, modality) opens the memory-mapped store (in a Dask
    worker too); an array or an object with `gather` is used as it is."""
    if isinstance(source, tuple):
        return EmbeddingStore.open(*source)
    if isinstance(source, np.ndarray):
        return ArrayVectors(source)
    return source


def kmeans(x: np.ndarray, k: int, params: SemanticParams) -> np.ndarray:
    """Spherical k-means centroids (faiss), trained on at most k * points_per_centroid of x."""
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=params.niter,
        spherical=True,
        seed=params.seed,
        verbose=False,
        max_points_per_centroid=params.points_per_centroid,
        min_points_per_centroid=1,
    )
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return km.centroids


def assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Each row's nearest centroid (inner product)."""
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    return index.search(np.ascontiguousarray(x, dtype=np.float32), 1)[1][:, 0]


def root_groups(
    vectors: Any, ids: np.ndarray, params: SemanticParams = SemanticParams(), batch: int = 65536
) -> list[np.ndarray]:
    """Split `ids` into cluster groups of about `group_size` (global ids, sorted, none empty)."""
    ids = np.sort(np.asarray(ids, dtype=np.int64))
    k = math.ceil(len(ids) / params.group_size)
    if k <= 1:
        return [ids] if len(ids) else []
    rng = np.random.default_rng(params.seed)
    sample = np.sort(
        rng.choice(ids, size=min(len(ids), k * params.points_per_centroid), replace=False)
    )
    centroids = kmeans(vectors.gather(sample), k, params)
    labels = np.concatenate(
        [
            assign(vectors.gather(ids[lo : lo + batch]), centroids)
            for lo in range(0, len(ids), batch)
        ]
    )
    return [ids[labels == c] for c in range(k) if np.any(labels == c)]


def _leaves(x: np.ndarray, members: np.ndarray, params: SemanticParams) -> list[np.ndarray]:
    """Positions (into x) of the leaves under `members`: recursive
    k-means down to about leaf_size."""
    if len(members) <= 2 * params.leaf_size:
        return [members]
    k = min(params.branch, math.ceil(len(members) / params.leaf_size))
    labels = assign(x[members], kmeans(x[members], k, params))
    parts = [members[labels == c] for c in range(k) if np.any(labels == c)]
    if len(parts) == 1:  # k-means cannot split (identical vectors): compare them all
        return [members]
    return [leaf for part in parts for leaf in _leaves(x, part, params)]


def leaf_links(x: np.ndarray, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """For rows of x in keep order: each row's largest cosine to an earlier row, and that row.

    Row 0 (nothing before it) gets -inf and -1. Computed in column blocks, never the whole
    square at once.
    """
    n = len(x)
    best = np.full(n, -np.inf, np.float32)
    arg = np.full(n, -1, np.int64)
    for j0 in range(1, n, block):
        j1 = min(n, j0 + block)
        sims = x[:j1] @ x[j0:j1].T
        sims[
            np.arange(j1)[:, None] >= np.arange(j0, j1)[None, :]
        ] = -np.inf  # only earlier rows count
        arg[j0:j1] = sims.argmax(axis=0)
        best[j0:j1] = sims.max(axis=0)
    return best, arg


def group_links(
    source: Any, ids: np.ndarray, ranks: np.ndarray, params: SemanticParams = SemanticParams()
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One cluster group (one task): (ids, each id's largest cosine to a preferred member of its
    leaf, that member's global id or -1). `ranks` orders the keep preference (lower is kept)."""
    ids = np.asarray(ids, dtype=np.int64)
    vectors = open_vectors(source)
    x = vectors.gather(ids)
    best = np.full(len(ids), -np.inf, np.float32)
    nearest = np.full(len(ids), -1, np.int64)
    for leaf in _leaves(x, np.arange(len(ids)), params):
        leaf = leaf[np.lexsort((ids[leaf], ranks[leaf]))]  # keep order: rank, then id
        sims, arg = leaf_links(x[leaf])
        best[leaf] = sims
        nearest[leaf] = np.where(arg >= 0, ids[leaf[np.maximum(arg, 0)]], -1)
    return ids, best, nearest


def removed_mask(similarity: np.ndarray, eps: float) -> np.ndarray:
    """SemDeDup's rule on `group_links`' similarities: removed when similarity > 1 − ε."""
    check_eps(eps)
    return similarity > 1.0 - eps


def check_eps(eps: float) -> None:
    """ε is a cosine distance in (0, 1); anything else is a ValueError naming it."""
    if not (isinstance(eps, (int, float)) and 0.0 < float(eps) < 1.0):
        raise ValueError(
            "eps must be in (0, 1) (a cosine distance: "
            f"removed when similarity > 1 - eps), got {eps!r}"
        )
