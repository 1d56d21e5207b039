"""A 10M-row collection in minutes: `bench.synthetic.write_vector_part` run in several processes,
each part's exact top-k for a set of held-out queries computed as the part is written.

The exact answers over ten million 512-d vectors cost as much as the writing (1,000 queries x
10M x 512); computed part by part while the part's vectors are still in the page cache, they
need no second pass over 10 GB. They are exact inner products over the stored float16 values,
as `indices.tune.exact_topk` computes them.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

from bench.synthetic import clustered_vectors, write_vector_part
from collection import schema as S
from collection.embeddings import EmbeddingStore, open_npy
from collection.storage import write_collection_json

log = logging.getLogger(__name__)

#: held-out queries: caption-like (wider spread) views of the same cluster centres, a seed no part
#: uses
QUERY_SEED = 987_654_321


def held_out_queries(n: int, dim: int, n_clusters: int = 1000) -> np.ndarray:
    """n query vectors from the collection's distribution, none of them in it."""
    return clustered_vectors(n, dim, n_clusters, spread=0.8, seed=QUERY_SEED, fast=True)


def _truth_path(folder: str, part: int) -> str:
    return os.path.join(folder, f"part_{part:05d}.npz")


def _part_job(args: tuple) -> int:
    """Write one part (if missing) and its top-k for the queries (if missing); returns the part."""
    root, part, n, parts, dim, seed, n_clusters, queries, k, truth = args
    write_vector_part(root, part, n, parts, dim, seed, n_clusters, fast=True)
    if queries is not None and not os.path.exists(_truth_path(truth, part)):
        x = np.asarray(open_npy(S.CollectionLayout(root).img_emb(part)), dtype=np.float32)
        s = queries @ x.T
        kk = min(k, s.shape[1])
        idx = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        tmp = _truth_path(truth, part) + ".tmp.npz"
        np.savez(tmp, ids=idx.astype(np.int64), scores=np.take_along_axis(s, idx, 1))
        os.replace(tmp, _truth_path(truth, part))
    return part


def write_scale_collection(
    root: str,
    n: int,
    parts: int,
    dim: int = 512,
    processes: int = 2,
    queries: np.ndarray | None = None,
    k: int = 10,
    truth: str | None = None,
    clip_model: str = "open_clip:ViT-B-32",
    seed: int = 0,
    n_clusters: int = 1000,
) -> str:
    """`bench.synthetic.write_vector_collection`'s collection written by `processes` processes;
    with `queries`, each image part's top-k for them goes to the folder `truth`
    (`exact_truth` joins them). Parts already written are kept."""
    os.makedirs(root, exist_ok=True)
    if queries is not None:
        os.makedirs(truth or root + ".truth", exist_ok=True)
    jobs = [
        (root, p, n, parts, dim, seed, n_clusters, queries, k, truth or root + ".truth")
        for p in range(parts)
    ]
    env = {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    os.environ.update({"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})  # one core each
    try:
        with ProcessPoolExecutor(processes) as pool:
            for done, _part in enumerate(pool.map(_part_job, jobs), 1):
                if done % 10 == 0 or done == parts:
                    log.info("%s: %d of %d parts written", root, done, parts)
    finally:
        for name, value in env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    write_collection_json(
        root, {"clip_model": clip_model, "emb_dim": dim, "parts": parts, "count": n}
    )
    return root


def exact_truth(root: str, truth: str, k: int = 10) -> np.ndarray:
    """The queries' exact top-k global ids over the image embeddings, joined from the parts'."""
    store = EmbeddingStore.open(root, S.MODALITY_IMAGE)
    ids: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    for i, part in enumerate(store.parts):
        with np.load(_truth_path(truth, part)) as z:
            ids.append(z["ids"] + int(store.offsets[i]))
            scores.append(z["scores"])
    all_ids, all_s = np.concatenate(ids, axis=1), np.concatenate(scores, axis=1)
    order = _order(all_ids, all_s, k)
    return np.take_along_axis(all_ids, order, 1)


def _order(ids: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """Per row, positions of the k best scores (ties to the lower id)."""
    out = np.empty((len(ids), k), dtype=np.int64)
    for r in range(len(ids)):
        out[r] = np.lexsort((ids[r], -scores[r]))[:k]
    return out


def describe(n: int, parts: int, dim: int, n_queries: int) -> dict[str, Any]:
    """What the generated collection and queries are, for the results file."""
    return {
        "n": n,
        "parts": parts,
        "dim": dim,
        "generator": "bench.synthetic.clustered_vectors: 1000 clusters, image spread 0.6, "
        "text spread 0.8, float16",
        "queries": f"{n_queries} held-out vectors (spread 0.8, seed {QUERY_SEED}), not in the "
        "collection; truth = exact inner product over all stored float16 image vectors",
    }
