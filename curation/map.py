"""The embedding map: a 2-D layout of the whole collection, and regions of it as subset clauses.

    python -m curation.map COLLECTION [--modality image] [--sample 100000] [--clusters 16]
                           [--place nearest|transform] [--seed 0]

UMAP (umap-learn, cosine metric) lays out a random sample of up to `--sample` embeddings; every
other sample is placed by `--place`: `nearest` (default: the similarity-weighted mean position
of its nearest sampled neighbours, one faiss search, cheap at any scale) or `transform`
(umap's own out-of-sample transform, slower). `cluster` is a spherical k-means cluster of the
embeddings (not of the 2-D points), so colours on the map mean what the model sees.

Writes `map/{modality}.parquet` (key, x, y, cluster; rows in global-id order) and
`map/{modality}.json` (parameters, timings). `region_clause` turns a rectangle or a lasso
polygon drawn on the map into the ids inside it: a subset spec's map-region clause.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any, Sequence

import faiss
import numpy as np
import pyarrow as pa

from collection import schema as S
from collection.parts import CollectionError
from collection.storage import write_json
from curation.vectors import open_store, read_keys, read_table, write_table
from models.runtime import setup_logging

log = logging.getLogger(__name__)

MAP_SAMPLE = 100_000
DEFAULT_CLUSTERS = 16
#: sampled neighbours that place an unsampled point (nearest placement)
PLACE_NEIGHBOURS = 5
PLACEMENTS = ("nearest", "transform")


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
    sampled rows."""
    index = faiss.IndexFlatIP(sample_x.shape[1])
    index.add(np.ascontiguousarray(sample_x, dtype=np.float32))
    sims, nn = index.search(np.ascontiguousarray(x, dtype=np.float32), min(k, len(sample_x)))
    w = np.maximum(sims, 1e-6)
    return (np.einsum("nk,nkd->nd", w, sample_xy[nn]) / w.sum(axis=1, keepdims=True)).astype(
        np.float32
    )


def _clusters(
    vectors: Any,
    sample_ids: np.ndarray,
    sample_x: np.ndarray,
    n: int,
    k: int,
    seed: int,
    batch: int,
) -> np.ndarray:
    k = max(1, min(k, len(sample_ids)))
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
    index = faiss.IndexFlatIP(sample_x.shape[1])
    index.add(km.centroids)
    labels = np.empty(n, np.int32)
    for lo in range(0, n, batch):
        ids = np.arange(lo, min(n, lo + batch))
        labels[ids] = index.search(vectors.gather(ids), 1)[1][:, 0]
    return labels


def compute_map(
    collection: str,
    modality: str = S.MODALITY_IMAGE,
    sample: int = MAP_SAMPLE,
    clusters: int = DEFAULT_CLUSTERS,
    place: str = "nearest",
    seed: int = 0,
    batch: int = 65536,
) -> dict[str, Any]:
    """Lay out the collection; write map/{modality}.parquet and .json; return the report."""
    if place not in PLACEMENTS:
        raise ValueError(f"place must be one of {list(PLACEMENTS)}, got {place!r}")
    if sample < 3:
        raise ValueError(f"sample must be at least 3, got {sample}")
    started = time.time()
    store = open_store(collection, modality)
    n = store.count
    keys = read_keys(collection)  # before the layout: a missing part fails at once
    if len(keys) != n:
        raise CollectionError(f"{collection}: {len(keys)} embedded rows but {n} {modality} vectors")
    rng = np.random.default_rng(max(seed, 0))
    sample_ids = np.sort(rng.choice(n, size=min(n, sample), replace=False))
    sample_x = store.gather(sample_ids)
    t0 = time.time()
    sample_xy, reducer = layout(sample_x, None if seed < 0 else seed)
    layout_seconds = time.time() - t0
    xy = np.empty((n, 2), np.float32)
    xy[sample_ids] = sample_xy
    rest = np.setdiff1d(np.arange(n), sample_ids)
    t0 = time.time()
    for lo in range(0, len(rest), batch):
        ids = rest[lo : lo + batch]
        x = store.gather(ids)
        xy[ids] = (
            reducer.transform(x)
            if place == "transform" and reducer is not None
            else place_nearest(sample_x, sample_xy, x)
        )
    place_seconds = time.time() - t0
    labels = _clusters(store, sample_ids, sample_x, n, clusters, seed, batch)
    layout_ = S.InsightLayout(collection)
    path = layout_.map(modality)
    write_table(
        path,
        pa.table(
            {
                S.KEY: pa.array(list(keys), pa.string()),
                S.MAP_X: pa.array(xy[:, 0]),
                S.MAP_Y: pa.array(xy[:, 1]),
                S.MAP_CLUSTER: pa.array(labels),
            }
        ),
    )
    report = {
        "path": path,
        "modality": modality,
        "samples": n,
        "laid_out": int(len(sample_ids)),
        "placed": int(len(rest)),
        "place": place,
        "clusters": int(labels.max() + 1) if n else 0,
        "seed": seed,
        "layout_seconds": round(layout_seconds, 3),
        "place_seconds": round(place_seconds, 3),
        "seconds": round(time.time() - started, 3),
    }
    write_json(path.removesuffix(".parquet") + ".json", report)
    log.info(
        "%s: map of %d samples (%d laid out by UMAP) -> %s", collection, n, len(sample_ids), path
    )
    return report


def read_map(collection: str, modality: str = S.MODALITY_IMAGE) -> pa.Table:
    """map/{modality}.parquet (FileNotFoundError naming the command that writes it)."""
    return read_table(
        S.InsightLayout(collection).map(modality),
        f"{modality} map; run `python -m curation.map {collection} --modality {modality}`",
    )


def points_in_polygon(
    x: np.ndarray, y: np.ndarray, polygon: Sequence[Sequence[float]]
) -> np.ndarray:
    """Even-odd rule: which points (x[i], y[i]) lie inside the polygon (a lasso: vertices in
    order)."""
    poly = np.asarray(polygon, dtype=np.float64)
    if poly.ndim != 2 or poly.shape[1] != 2 or len(poly) < 3:
        raise ValueError(
            f"polygon: need at least 3 (x, y) vertices, got {np.asarray(polygon).tolist()!r}"
        )
    inside = np.zeros(len(x), bool)
    for (x0, y0), (x1, y1) in zip(poly, np.roll(poly, -1, axis=0)):
        crosses = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            at = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < at)
    return inside


def region_mask(
    table: pa.Table,
    rect: Sequence[float] | None = None,
    polygon: Sequence[Sequence[float]] | None = None,
) -> np.ndarray:
    """Rows of a map table inside a rectangle (x0, y0, x1, y1) or a lasso polygon (exactly one)."""
    if (rect is None) == (polygon is None):
        raise ValueError(
            "map region: give exactly one of rect (x0, y0, x1, y1) or polygon [(x, y), ...]"
        )
    x = table.column(S.MAP_X).to_numpy()
    y = table.column(S.MAP_Y).to_numpy()
    if rect is not None:
        if len(rect) != 4:
            raise ValueError(f"map region: rect is (x0, y0, x1, y1), got {list(rect)!r}")
        x0, x1 = sorted((float(rect[0]), float(rect[2])))
        y0, y1 = sorted((float(rect[1]), float(rect[3])))
        return (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
    return points_in_polygon(x, y, polygon)


def keys_in_region(
    collection: str,
    modality: str = S.MODALITY_IMAGE,
    rect: Sequence[float] | None = None,
    polygon: Sequence[Sequence[float]] | None = None,
) -> list[str]:
    """Keys of the samples inside a region of the map."""
    table = read_map(collection, modality)
    return [
        k
        for k, inside in zip(table.column(S.KEY).to_pylist(), region_mask(table, rect, polygon))
        if inside
    ]


def region_clause(
    collection: str,
    ids: Sequence[int] | np.ndarray,
    modality: str = S.MODALITY_IMAGE,
    rect: Sequence[float] | None = None,
    polygon: Sequence[Sequence[float]] | None = None,
) -> np.ndarray:
    """A subset spec's map-region clause: the `ids` whose map point lies in the rectangle or
    polygon."""
    table = read_map(collection, modality)
    inside = region_mask(table, rect, polygon)
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) and ids.max() >= len(inside):
        raise CollectionError(
            f"{collection}: the {modality} map has {len(inside)} points but id {ids.max()} was "
            f"asked for; rerun `python -m curation.map {collection}`"
        )
    return ids[inside[ids]]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m curation.map",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("collection")
    p.add_argument("--modality", default=S.MODALITY_IMAGE, choices=S.MODALITIES)
    p.add_argument(
        "--sample", type=int, default=MAP_SAMPLE, help="embeddings laid out by UMAP itself"
    )
    p.add_argument(
        "--clusters", type=int, default=DEFAULT_CLUSTERS, help="k-means clusters of the embeddings"
    )
    p.add_argument(
        "--place", default="nearest", choices=PLACEMENTS, help="how unsampled points are placed"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="layout seed (-1: unseeded, multi-threaded UMAP)"
    )
    a = p.parse_args(argv)
    setup_logging()
    try:
        print(
            json.dumps(compute_map(a.collection, a.modality, a.sample, a.clusters, a.place, a.seed))
        )
    except (ValueError, FileNotFoundError) as exc:  # bad input: one line, no traceback
        p.error(str(exc))


if __name__ == "__main__":
    main()
