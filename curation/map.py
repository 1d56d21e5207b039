"""The embedding map: a 2-D layout of the whole collection, and regions of it as subset clauses.

    python -m curation.map COLLECTION [--modality image] [--sample 100000] [--clusters 16]
                           [--place nearest|transform] [--seed 0]

UMAP (umap-learn, cosine metric) lays out a random sample of up to `--sample` embeddings; every
other sample is placed by `--place`: `nearest` (default: the similarity-weighted mean position
of its nearest sampled neighbours, found in a few IVF lists of a sample above 20k: a row's cost
does not grow with the collection) or `transform` (umap's own out-of-sample transform, slower).
`cluster` is a spherical k-means cluster of the embeddings (not of the 2-D points), so colours on
the map mean what the model sees.

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

import numpy as np
import pyarrow as pa

from collection import schema as S
from collection.cluster_options import add_cluster_options
from collection.parts import CollectionError
from collection.storage import write_json
from curation.map_job import (  # noqa: F401 - layout, place_nearest: public names
    PLACE_NEIGHBOURS,
    layout,
    map_job,
    place_nearest,
)
from curation.vectors import read_table
from models.runtime import setup_logging

log = logging.getLogger(__name__)

MAP_SAMPLE = 100_000
DEFAULT_CLUSTERS = 16
PLACEMENTS = ("nearest", "transform")


def compute_map(
    collection: str,
    modality: str = S.MODALITY_IMAGE,
    sample: int = MAP_SAMPLE,
    clusters: int = DEFAULT_CLUSTERS,
    place: str = "nearest",
    seed: int = 0,
    batch: int = 65536,
    scheduler: str | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Lay out the collection; write map/{modality}.parquet and .json; return the report.

    The sample's layout is made here; every part is placed by one Dask task (a LocalCluster of
    `workers` processes, the cluster at `scheduler`, or with `workers=0` this process)."""
    if place not in PLACEMENTS:
        raise ValueError(f"place must be one of {list(PLACEMENTS)}, got {place!r}")
    if sample < 3:
        raise ValueError(f"sample must be at least 3, got {sample}")
    started = time.time()
    path = S.InsightLayout(collection).map(modality)
    done = map_job(
        collection, modality, sample, clusters, place, seed, batch, path, scheduler, workers
    )
    report = {
        "path": path,
        "modality": modality,
        "samples": done["samples"],
        "laid_out": done["laid_out"],
        "placed": done["placed"],
        "place": place,
        "clusters": done["clusters"],
        "seed": seed,
        "layout_seconds": done["layout_seconds"],
        "place_seconds": done["place_seconds"],
        "tasks": done["tasks"],
        "tasks_run": done["tasks_run"],
        "seconds": round(time.time() - started, 3),
    }
    write_json(path.removesuffix(".parquet") + ".json", report)
    log.info(
        "%s: map of %d samples (%d laid out by UMAP) -> %s",
        collection,
        done["samples"],
        done["laid_out"],
        path,
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
    add_cluster_options(p)
    a = p.parse_args(argv)
    setup_logging()
    try:
        print(
            json.dumps(
                compute_map(
                    a.collection,
                    a.modality,
                    a.sample,
                    a.clusters,
                    a.place,
                    a.seed,
                    scheduler=a.scheduler,
                    workers=a.workers,
                )
            )
        )
    except (ValueError, FileNotFoundError) as exc:  # bad input: one line, no traceback
        p.error(str(exc))


if __name__ == "__main__":
    main()
