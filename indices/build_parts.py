"""The distributed IVF build: train once, one Dask task per group of parts, merge on disk.

The recipe FAISS documents for indexes that do not fit in RAM, and autofaiss runs on Spark:
the driver trains the empty index on a sample and writes it with its checksum; each task reads
its parts' vectors, adds them at their global ids to a copy of that index and writes its part
index atomically, recording the checksum; `indices.merge` then joins the parts' inverted lists
into one file that search memory-maps. The driver holds only the training sample. A part index
whose json names the same trained index and the same parts is reused, so a killed build rerun
adds only what is missing; one from another training is rebuilt.

Files, beside the modality's index: `indices/{modality}.parts/trained.index` + `.json` and
`{first}-{last}.index` + `.json` per group of parts (the json written last).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import faiss
import numpy as np
from faiss.contrib.clustering import two_level_clustering

from collection import schema as S
from collection.cluster import SINGLE_THREAD_WORKER_ENV, each_completed, open_cluster
from collection.embeddings import EmbeddingStore, open_npy
from collection.parts import CollectionError
from collection.storage import atomic_path, read_json, url_to_fs, write_json
from indices.merge import merge_parts
from indices.select import MIN_PER_LIST
from models.runtime import cores

log = logging.getLogger(__name__)

#: training points per list aimed for while the sample stays under MAX_TRAIN
PER_LIST = 64
MAX_TRAIN = 2**17
MIN_TRAIN = 2**15
#: list count from which the coarse quantizer is trained by two-level k-means: a flat k-means
#: of 4,096 lists on its 160k-point sample already takes minutes on two cores
TWO_LEVEL_MIN = 4096
#: training points per PQ centroid (faiss samples at most this many) and k-means iterations
PQ_POINTS_PER_CENTROID = 40
PQ_ITERATIONS = 12
#: vectors per Dask task: a part index of this many 512-d float vectors is 2 GiB at most
GROUP_VECTORS = 2**20
#: groups a collection is cut into at least (parts allowing), so several workers share a small
#: one; fixed rather than read from the cluster, so a rerun on other workers reuses the parts
MIN_GROUPS = 16
TRAINED = "trained"
#: the build's worker processes: one faiss thread each (a worker per core) and one malloc arena
BUILD_WORKER_ENV = {**SINGLE_THREAD_WORKER_ENV, "OMP_NUM_THREADS": "1"}


def train_size(n: int, nlist: int | None) -> int:
    """Training points for n vectors and nlist lists: 64 per list up to MAX_TRAIN, never fewer
    than MIN_PER_LIST per list (nlist_for keeps nlist ≤ n / 39), all of them when n is small."""
    lists = nlist or 1
    return min(n, max(MIN_PER_LIST * lists, min(PER_LIST * lists, MAX_TRAIN), MIN_TRAIN))


def train_index(store: EmbeddingStore, key: str, nlist: int | None, seed: int) -> Any:
    """An empty index of `key`, trained on a random sample of the store (read by gather, so
    only the sample is ever in memory). From TWO_LEVEL_MIN lists the coarse centroids come from
    two-level k-means (`two_level_centroids`)."""
    index = faiss.index_factory(store.dim, key, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(index)
    ivf = faiss.downcast_index(ivf) if ivf is not None else None
    if hasattr(ivf, "do_polysemous_training"):
        # the factory turns on polysemous training for IVF..,PQ keys: minutes of annealing of
        # the codes' order for Hamming filtering, which search never uses
        ivf.do_polysemous_training = False
        # one k-means per sub-quantizer, 256 points a centroid and 25 iterations by default:
        # ~8 s each on a busy core at 4 dims, 17 minutes for 128 of them. The exact re-rank
        # corrects PQ's error, so the codebooks train on fewer points for fewer iterations
        ivf.pq.cp.max_points_per_centroid = PQ_POINTS_PER_CENTROID
        ivf.pq.cp.niter = PQ_ITERATIONS
    if not index.is_trained:
        _, xt = store.sample(train_size(store.count, nlist), seed)
        direct = not isinstance(faiss.downcast_index(index), faiss.IndexPreTransform)
        if ivf is not None and direct and ivf.nlist >= TWO_LEVEL_MIN:
            centroids = two_level_centroids(xt, int(ivf.nlist), seed)
            ivf.quantizer.train(centroids)
            ivf.quantizer.add(centroids)  # a full quantizer: index.train trains only the codes
        index.train(xt)
    return index


def two_level_centroids(xt: np.ndarray, nlist: int, seed: int) -> np.ndarray:
    """nlist k-means centroids of xt, found as sqrt(nlist) clusters each split in proportion to
    its points (faiss's two-level clustering): each point meets 2·sqrt(nlist) centroids per
    iteration instead of nlist, which makes 16k lists trainable on two cores."""
    outer = max(2, int(np.sqrt(nlist)))
    centroids, _ = two_level_clustering(xt, outer, nlist, seed=seed)
    log.info("two-level k-means: %d x %d lists from %d points", outer, nlist, len(xt))
    return np.ascontiguousarray(centroids, dtype=np.float32)


def checksum(path: str) -> str:
    """sha256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def parts_dir(root: str, modality: str) -> str:
    """The local folder holding the trained index and the part indices of `modality`."""
    return url_to_fs(S.CollectionLayout(root).index(modality))[1] + ".parts"


def groups(parts: Sequence[int], offsets: np.ndarray, size: int) -> list[list[int]]:
    """Positions of consecutive parts, grouped so a group holds about `size` vectors."""
    out: list[list[int]] = [[]]
    held = 0
    for i in range(len(parts)):
        if out[-1] and held + int(offsets[i + 1] - offsets[i]) > size:
            out.append([])
            held = 0
        out[-1].append(i)
        held += int(offsets[i + 1] - offsets[i])
    return [g for g in out if g]


def trained_index(
    store: EmbeddingStore, key: str, nlist: int | None, seed: int, folder: str
) -> tuple[str, str]:
    """(path, checksum) of the empty trained index: the one on disk when its json records the
    same key, seed and parts (a rerun trains nothing), else trained now and written atomically."""
    path = os.path.join(folder, f"{TRAINED}.index")
    meta = os.path.join(folder, f"{TRAINED}.json")
    want = {
        "index_key": key,
        "dim": store.dim,
        "seed": seed,
        "parts": store.parts,
        "count": store.count,
    }
    doc = read_json(meta)
    if isinstance(doc, dict) and {k: doc.get(k) for k in want} == want and os.path.exists(path):
        if checksum(path) == doc.get("checksum"):
            log.info("%s: reusing the trained index", path)
            return path, doc["checksum"]
    index = train_index(store, key, nlist, seed)
    os.makedirs(folder, exist_ok=True)
    with atomic_path(path) as tmp:
        faiss.write_index(index, tmp)
    digest = checksum(path)
    write_json(meta, {**want, "checksum": digest})
    return path, digest


def add_group(
    root: str,
    modality: str,
    parts: list[int],
    first_ids: list[int],
    trained: str,
    digest: str,
    out: str,
) -> dict[str, Any]:
    """One Dask task: add these parts' vectors at their global ids to a copy of the trained
    index, write it atomically to `out` and its json (the trained checksum) last."""
    if checksum(trained) != digest:
        raise CollectionError(f"{trained}: changed since the build started; run it again")
    index = faiss.read_index(trained)
    layout = S.CollectionLayout(root)
    count = 0
    for n, first in zip(parts, first_ids):
        x = np.ascontiguousarray(np.asarray(open_npy(layout.emb(modality, n))), np.float32)
        if x.shape[0]:
            if x.shape[1] != index.d:
                raise CollectionError(
                    f"{layout.emb(modality, n)}: dim {x.shape[1]}, the index has {index.d}"
                )
            index.add_with_ids(x, np.arange(first, first + x.shape[0], dtype=np.int64))
            count += x.shape[0]
    with atomic_path(out) as tmp:
        faiss.write_index(index, tmp)
    doc = {"trained_checksum": digest, "parts": parts, "first_ids": first_ids, "count": count}
    write_json(_meta(out), doc)
    return doc


def _meta(index_path: str) -> str:
    return os.path.splitext(index_path)[0] + ".json"


def is_current(out: str, parts: list[int], first_ids: list[int], digest: str) -> bool:
    """Whether the part index at `out` holds these parts at these ids, added to this training."""
    doc = read_json(_meta(out))
    return (
        isinstance(doc, dict)
        and os.path.exists(out)
        and doc.get("trained_checksum") == digest
        and doc.get("parts") == parts
        and doc.get("first_ids") == first_ids
    )


def build_distributed(
    store: EmbeddingStore,
    key: str,
    nlist: int | None,
    seed: int,
    client: Any = None,
    scheduler: str | None = None,
    workers: int | None = None,
) -> tuple[str, dict[str, Any]]:
    """Train, add the groups of parts on Dask, merge: (local path of the merged on-disk index,
    facts for the index json). The caller tunes the merged index and writes the json last."""
    root, modality = store.root, store.modality
    if not re.search(r"IVF\d+", key):
        raise ValueError(f"--index-key {key}: the distributed build needs an IVF index")
    folder = parts_dir(root, modality)
    trained, digest = trained_index(store, key, nlist, seed, folder)
    tasks, outs = [], []
    size = min(GROUP_VECTORS, -(-store.count // MIN_GROUPS))
    for g in groups(store.parts, store.offsets, size):
        parts = [store.parts[i] for i in g]
        first_ids = [int(store.offsets[i]) for i in g]
        out = os.path.join(folder, f"{parts[0]:05d}-{parts[-1]:05d}.index")
        outs.append(out)
        if is_current(out, parts, first_ids, digest):
            continue
        tasks.append((root, modality, parts, first_ids, trained, digest, out))
    log.info("%s: %d part indices, %d to build", modality, len(outs), len(tasks))
    path = url_to_fs(S.CollectionLayout(root).index(modality))[1]
    with _cluster(client, scheduler, workers, len(tasks)) as on:
        if tasks:
            _add(tasks, on)
        for out in outs:  # a part from another training is never merged
            doc = read_json(_meta(out)) or {}
            if doc.get("trained_checksum") != digest:
                raise RuntimeError(f"{out}: added to another trained index; run the build again")
        # one more task: the parts it maps and the lists it writes (twice the index's size)
        # count in a worker's memory, and the driver's stays the training sample's
        ivfdata = on.submit(
            merge_parts, root, modality, trained, outs, path, pure=False, retries=0
        ).result()
    _remove_stale(folder, outs)
    return path, {
        "on_disk": True,
        "ivfdata": os.path.basename(ivfdata),
        "ivfdata_bytes": os.path.getsize(ivfdata),
        "trained_checksum": digest,
        "part_indices": {"total": len(outs), "built": len(tasks), "reused": len(outs) - len(tasks)},
    }


def _remove_stale(folder: str, outs: list[str]) -> None:
    """Remove part indices of an earlier set of parts or grouping: no merge will read them."""
    keep = {os.path.basename(p) for o in outs for p in (o, _meta(o))}
    keep |= {f"{TRAINED}.index", f"{TRAINED}.json"}
    for name in os.listdir(folder):
        if name not in keep and name.endswith((".index", ".json")):
            os.remove(os.path.join(folder, name))


@contextmanager
def _cluster(client: Any, scheduler: str | None, workers: int | None, tasks: int) -> Iterator[Any]:
    """The given client, or one on a cluster opened here (and closed on the way out)."""
    if client is not None:
        yield client
        return
    n = workers or max(1, min(cores(), tasks))
    session = open_cluster(scheduler, n, worker_env=BUILD_WORKER_ENV)
    try:
        yield session.client
    finally:
        session.close()


def _add(tasks: list[tuple], client: Any) -> None:
    """Run `add_group` for every task; every task runs to its end, then the first failure is
    raised: the finished part indices stay for a rerun."""
    failed: list[tuple[str, BaseException]] = []
    for o in each_completed(client, add_group, tasks, "index-part"):
        if o.error is not None:
            failed.append((tasks[o.index][-1], o.error))
            log.error("%s: %s", tasks[o.index][-1], o.error)
    if failed:
        out, exc = failed[0]
        raise RuntimeError(
            f"{len(failed)} of {len(tasks)} part indices failed, first {out}: "
            f"{type(exc).__name__}: {exc}; rerun to build only those"
        )
