"""The map job: the driver lays out a fixed-size sample with UMAP and fits the k-means centroids
(the "model", written to the task folder once); one task per part places its rows against the
sample and labels their clusters, writing (key, x, y, cluster); the parts are then streamed into
`map/{modality}.parquet` in global-id order. The driver's memory depends on the sample size, not
on the collection's. A row is placed by searching a few IVF lists of the sample (lists fitted by
the driver, written with the model), so its cost is bounded by the lists probed, not the sample.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import pickle
import time
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from collection import schema as S
from collection.embeddings import EmbeddingStore
from collection.storage import file_signature, url_to_fs, write_bytes
from curation.vector_jobs import (
    Runner,
    TaskFolder,
    check_parts,
    concat_outputs,
    part_keys,
    part_params,
    task_folder,
)
from curation.vectors import open_store, read_rows

log = logging.getLogger(__name__)

SCHEMA = pa.schema(
    [
        pa.field(S.KEY, pa.string()),
        pa.field(S.MAP_X, pa.float32()),
        pa.field(S.MAP_Y, pa.float32()),
        pa.field(S.MAP_CLUSTER, pa.int32()),
    ]
)
MODEL = "model"
#: sampled neighbours that place an unsampled point (nearest placement)
PLACE_NEIGHBOURS = 5
#: samples up to this size are searched exhaustively (at most this many dot products a placed
#: row); larger ones through an IVF index of about 4·√sample lists
PLACE_EXACT_MAX = 20_000
#: IVF lists searched per placed row: the fewest whose placements all agree with exhaustive
#: search at 1M rows (every row within 1% of the layout's extent, the same 5 neighbours), at a
#: third of 16's cost (bench/results/map_place.json)
PLACE_NPROBE = 4
#: ... and at least enough lists to hold this many sampled rows on average: a small sample's
#: lists hold a few rows each, and 4 of them would leave a row too few neighbours to choose from
PLACE_MIN_CANDIDATES = 300


def _umap(seed: int | None, n_neighbors: int, min_dist: float) -> Any:
    import umap  # noqa: E402 - heavy (numba compiles on first import): only when a layout is made

    # a seed makes the layout reproducible; umap then runs single-threaded
    return umap.UMAP(
        n_components=2,
        n_neighbors=n_neighbors,
        min_dist=min_dist,
        metric="cosine",
        random_state=seed,
        n_jobs=1 if seed is not None else -1,
        low_memory=True,
    )


def layout(
    x: np.ndarray, seed: int | None = 0, n_neighbors: int = 15, min_dist: float = 0.1
) -> tuple[np.ndarray, Any]:
    """(n, 2) float32 UMAP coordinates of the rows of x, and the fitted reducer."""
    if len(x) < 3:
        return np.zeros((len(x), 2), np.float32), None
    reducer = _umap(seed, min(n_neighbors, len(x) - 1), min_dist)
    return np.asarray(
        reducer.fit_transform(np.ascontiguousarray(x, dtype=np.float32)), np.float32
    ), reducer


def place_nearest(
    sample_x: np.ndarray, sample_xy: np.ndarray, x: np.ndarray, k: int = PLACE_NEIGHBOURS
) -> np.ndarray:
    """Positions for rows of x: the similarity-weighted mean position of their k nearest
    sampled rows (exhaustive search)."""
    return place_with(place_index(sample_x, np.zeros((0, sample_x.shape[1]))), sample_xy, x, k)


def place_lists(sample: int) -> int:
    """IVF lists over a sample of `sample` rows: 0 (exhaustive search) up to PLACE_EXACT_MAX."""
    return 0 if sample <= PLACE_EXACT_MAX else int(4 * math.sqrt(sample))


def place_index(sample_x: np.ndarray, lists: np.ndarray, nprobe: int | None = None) -> faiss.Index:
    """An inner-product index of the sample: exhaustive without `lists` (centroids), else IVF over
    them probing `nprobe` lists (default: PLACE_NPROBE, or more for a small sample). Rows go to
    their list by exact search of the centroids, so every worker builds the same index from the
    same model."""
    x = np.ascontiguousarray(sample_x, dtype=np.float32)
    if not len(lists):
        index = faiss.IndexFlatIP(x.shape[1])
    else:
        quantizer = faiss.IndexFlatIP(x.shape[1])
        quantizer.add(np.ascontiguousarray(lists, dtype=np.float32))
        index = faiss.IndexIVFFlat(quantizer, x.shape[1], len(lists), faiss.METRIC_INNER_PRODUCT)
        index.is_trained = True  # the lists are the driver's k-means centroids
        if nprobe is None:
            nprobe = max(PLACE_NPROBE, math.ceil(PLACE_MIN_CANDIDATES * len(lists) / len(x)))
        index.nprobe = min(nprobe, len(lists))
    index.add(x)
    return index


def fit_centroids(sample_x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Spherical k-means centroids of the sample: the map's colours."""
    k = max(1, min(k, len(sample_x)))
    km = faiss.Kmeans(
        sample_x.shape[1],
        k,
        niter=20,
        spherical=True,
        seed=max(seed, 0),
        verbose=False,
        min_points_per_centroid=1,
    )
    km.train(np.ascontiguousarray(sample_x, dtype=np.float32))
    return np.asarray(km.centroids, np.float32)


def _model_path(folder: TaskFolder, ext: str) -> str:
    return folder.output(MODEL).removesuffix(".parquet") + ext


def write_model(
    folder: TaskFolder,
    sample_ids: np.ndarray,
    sample_x: np.ndarray,
    sample_xy: np.ndarray,
    centroids: np.ndarray,
    lists: np.ndarray,
    reducer: Any,
    seconds: float,
) -> None:
    """The sample, its layout, the centroids and the placement index's lists, then their marker
    (the reducer too, pickled, when points are placed by umap's transform)."""
    buf = io.BytesIO()
    np.savez(
        buf,
        sample_ids=sample_ids,
        sample_x=sample_x.astype(S.EMB_DTYPE),  # the store's own precision: nothing is lost
        sample_xy=sample_xy,
        centroids=centroids,
        lists=lists,
    )
    write_bytes(_model_path(folder, ".npz"), buf.getvalue())
    if reducer is not None:
        write_bytes(_model_path(folder, ".pkl"), pickle.dumps(reducer))
    folder.finish(MODEL, {"layout_seconds": seconds, "reducer": reducer is not None})


@functools.lru_cache(maxsize=1)
def _model(path: str, signature: Any) -> dict[str, Any]:
    """The model file, read once per worker process (a changed file is read again)."""
    fs, p = url_to_fs(path)
    with fs.open(p, "rb") as fh:
        data = np.load(io.BytesIO(fh.read()))
        model = {name: data[name] for name in data.files}
    model["sample_x"] = model["sample_x"].astype(np.float32)
    model["index"] = place_index(model["sample_x"], model["lists"])
    clusters = faiss.IndexFlatIP(model["centroids"].shape[1])
    clusters.add(np.ascontiguousarray(model["centroids"]))
    model["clusters"] = clusters
    return model


@functools.lru_cache(maxsize=1)
def _reducer(path: str, signature: Any) -> Any:
    fs, p = url_to_fs(path)
    with fs.open(p, "rb") as fh:
        return pickle.loads(fh.read())  # our own file, written by this job's driver


def place_with(index: Any, sample_xy: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    """Positions for rows of x: the similarity-weighted mean position of their k nearest rows of
    the sample held by `index`."""
    sims, nn = index.search(np.ascontiguousarray(x, dtype=np.float32), min(k, index.ntotal))
    w = np.where(nn >= 0, np.maximum(sims, 1e-6), 0.0)  # -1: fewer than k in the probed lists
    total = np.maximum(w.sum(axis=1, keepdims=True), 1e-12)
    return (np.einsum("nk,nkd->nd", w, sample_xy[np.maximum(nn, 0)]) / total).astype(np.float32)


def part_task(
    folder: TaskFolder,
    name: str,
    collection: str,
    modality: str,
    pos: int,
    place: str,
    neighbours: int,
    batch: int,
) -> dict[str, Any]:
    """One part's rows: key, x, y (sampled rows keep their layout position), cluster."""
    npz = _model_path(folder, ".npz")
    model = _model(npz, file_signature(npz))
    store = EmbeddingStore.open(collection, modality)
    start, rows, keys = part_keys(collection, store, pos)
    sample_ids, sample_xy = model["sample_ids"], model["sample_xy"]
    reducer = None
    if place == "transform" and len(sample_ids) >= 3:
        pkl = _model_path(folder, ".pkl")
        reducer = _reducer(pkl, file_signature(pkl))
    ids = np.arange(start, start + rows)
    at = np.minimum(np.searchsorted(sample_ids, ids), max(len(sample_ids) - 1, 0))
    sampled = sample_ids[at] == ids if len(sample_ids) else np.zeros(rows, bool)
    xy = np.empty((rows, 2), np.float32)
    labels = np.empty(rows, np.int32)
    xy[sampled] = sample_xy[at[sampled]]
    arr = store.arrays[pos]
    rest = np.nonzero(~sampled)[0]
    for lo in range(0, rows, batch):
        x = np.asarray(arr[lo : lo + batch], dtype=np.float32)
        labels[lo : lo + len(x)] = model["clusters"].search(x, 1)[1][:, 0]
        todo = rest[(rest >= lo) & (rest < lo + len(x))]
        if len(todo):
            x = x[todo - lo]
            xy[todo] = (
                reducer.transform(x)
                if reducer is not None
                else place_with(model["index"], sample_xy, x, neighbours)
            )
    folder.write(
        name,
        pa.table(
            {
                S.KEY: keys.cast(pa.string()),
                S.MAP_X: pa.array(xy[:, 0]),
                S.MAP_Y: pa.array(xy[:, 1]),
                S.MAP_CLUSTER: pa.array(labels),
            }
        ),
    )
    return {
        "rows": rows,
        "placed": int(len(rest)),
        "clusters": int(labels.max()) + 1 if rows else 0,
    }


def map_job(
    collection: str,
    modality: str,
    sample: int,
    clusters: int,
    place: str,
    seed: int,
    batch: int,
    path: str,
    scheduler: str | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Write `path` (map/{modality}.parquet); return the counts and timings for the report."""
    neighbours = PLACE_NEIGHBOURS
    check_parts(collection, modality)
    store = open_store(collection, modality)
    n = store.count
    counts = np.diff(store.offsets).tolist()
    params = {
        "modality": modality,
        "sample": sample,
        "clusters": clusters,
        "place": place,
        "seed": seed,
        "neighbours": neighbours,
        "place_lists": place_lists(min(n, sample)),
        "nprobe": PLACE_NPROBE,
        **part_params(collection, counts),
    }
    folder = task_folder(path, params)
    model = folder.result(MODEL)
    if model is None:
        rng = np.random.default_rng(max(seed, 0))
        # a sample of ids drawn without materialising all n (numpy's set-based draw for small ones)
        sample_ids = np.sort(rng.choice(n, size=min(n, sample), replace=False))
        sample_x = read_rows(store, sample_ids)
        t0 = time.time()
        sample_xy, reducer = layout(sample_x, None if seed < 0 else seed)
        seconds = round(time.time() - t0, 3)
        centroids = fit_centroids(sample_x, clusters, seed)
        lists = place_lists(len(sample_ids))
        lists = fit_centroids(sample_x, lists, seed) if lists else np.zeros((0, sample_x.shape[1]))
        write_model(
            folder,
            sample_ids,
            sample_x,
            sample_xy,
            centroids,
            lists.astype(np.float32),
            reducer if place == "transform" else None,
            seconds,
        )
        laid_out = len(sample_ids)
        del sample_x, sample_xy, reducer
        model = folder.result(MODEL)
    else:
        laid_out = min(n, sample)
        log.info("%s: reusing the layout of an unfinished run", folder.url)
    names = [f"part_{p:05d}" for p in store.parts]
    args = [(collection, modality, pos, place, neighbours, batch) for pos in range(len(names))]
    t0 = time.time()
    with Runner(scheduler, workers) as runner:
        results, ran = runner.run(part_task, folder, names, args)
    place_seconds = round(time.time() - t0, 3)
    rows = concat_outputs(folder, names, path, SCHEMA)
    folder.remove()
    return {
        "samples": rows,
        "laid_out": int(laid_out),
        "placed": sum(r["placed"] for r in results),
        "clusters": max((r["clusters"] for r in results), default=0),
        "layout_seconds": model["layout_seconds"],
        "place_seconds": place_seconds,
        "tasks": len(names),
        "tasks_run": ran,
    }
