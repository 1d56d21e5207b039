"""The embedding map (layout, regions -> keys, the region clause) and the uniqueness table."""

from __future__ import annotations

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from bench.synthetic import clustered_vectors, write_collection
from collection import schema as S
from collection.parts import CollectionError, read_metadata
from curation import map_job
from curation.map import (
    compute_map,
    keys_in_region,
    place_nearest,
    points_in_polygon,
    read_map,
    region_clause,
)
from curation.uniqueness import compute_uniqueness, read_uniqueness, uniqueness_scores
from curation.vectors import read_keys


@pytest.fixture(scope="module")
def mapped(insight_collection) -> dict:
    coll = insight_collection["collection"]
    report = compute_map(coll, sample=200, clusters=4)
    return {"collection": coll, "report": report, "table": read_map(coll).to_pandas()}


def test_the_map_lays_out_every_sample_in_id_order(mapped):
    table, report = mapped["table"], mapped["report"]
    assert list(table.columns) == list(S.MAP_COLUMNS)
    assert table[S.KEY].tolist() == list(read_keys(mapped["collection"]))
    assert report["laid_out"] == 200 and report["placed"] == len(table) - 200
    assert np.isfinite(table[[S.MAP_X, S.MAP_Y]].to_numpy()).all()
    assert set(table[S.MAP_CLUSTER]) == {0, 1, 2, 3}


def test_a_rectangle_or_a_lasso_gives_the_keys_inside(mapped):
    coll, table = mapped["collection"], mapped["table"]
    x, y = table[S.MAP_X].to_numpy(), table[S.MAP_Y].to_numpy()
    rect = (np.quantile(x, 0.2), np.quantile(y, 0.2), np.quantile(x, 0.7), np.quantile(y, 0.8))
    inside = (x >= rect[0]) & (x <= rect[2]) & (y >= rect[1]) & (y <= rect[3])
    assert keys_in_region(coll, rect=rect) == table[S.KEY][inside].tolist()
    assert (
        keys_in_region(coll, rect=(rect[2], rect[3], rect[0], rect[1]))
        == table[S.KEY][inside].tolist()
    )
    lasso = [(rect[0], rect[1]), (rect[2], rect[1]), (rect[2], rect[3]), (rect[0], rect[3])]
    assert set(keys_in_region(coll, polygon=lasso)) <= set(table[S.KEY][inside])
    ids = np.arange(0, len(table), 3)
    assert region_clause(coll, ids, rect=rect).tolist() == ids[inside[ids]].tolist()


def test_points_in_polygon_handles_concave_lassos():
    # an L shape: the notch at (1.5, 1.5) is outside
    poly = [(0, 0), (2, 0), (2, 1), (1, 1), (1, 2), (0, 2)]
    x = np.array([0.5, 1.5, 1.5, 0.5, 3.0])
    y = np.array([0.5, 0.5, 1.5, 1.5, 0.5])
    assert points_in_polygon(x, y, poly).tolist() == [True, True, False, True, False]


def test_bad_regions_get_one_line_errors(mapped):
    coll = mapped["collection"]
    with pytest.raises(ValueError, match="exactly one of rect"):
        region_clause(coll, [0], rect=(0, 0, 1, 1), polygon=[(0, 0), (1, 0), (0, 1)])
    with pytest.raises(ValueError, match="exactly one of rect"):
        region_clause(coll, [0])
    with pytest.raises(ValueError, match="at least 3"):
        keys_in_region(coll, polygon=[(0, 0), (1, 1)])
    with pytest.raises(ValueError, match=r"rect is \(x0, y0, x1, y1\)"):
        keys_in_region(coll, rect=(0, 1))
    with pytest.raises(FileNotFoundError, match="curation.map"):
        region_clause(coll, [0], modality="text", rect=(0, 0, 1, 1))


def test_nearest_placement_puts_a_point_among_its_neighbours():
    sample = np.eye(3, dtype=np.float32)
    xy = np.array([[0, 0], [10, 0], [0, 10]], np.float32)
    got = place_nearest(sample, xy, np.array([[1, 0.1, 0]], np.float32), k=1)
    assert got.tolist() == [[0.0, 0.0]]


def test_ivf_placement_agrees_with_exhaustive_search():
    # a sample above the exhaustive size: 5 neighbours found in 16 of ~690 lists
    sample = clustered_vectors(30_000, 64, n_clusters=300, seed=1)
    rows = clustered_vectors(3_000, 64, n_clusters=300, seed=2)
    xy = (sample @ np.random.default_rng(0).standard_normal((64, 2))).astype(np.float32)
    lists = map_job.fit_centroids(sample, map_job.place_lists(len(sample)), 0)
    index = map_job.place_index(sample, lists)
    assert isinstance(index, faiss.IndexIVFFlat) and index.nlist == len(lists) > 600
    got = map_job.place_with(index, xy, rows, map_job.PLACE_NEIGHBOURS)
    want = place_nearest(sample, xy, rows)
    extent = float(np.max(xy.max(axis=0) - xy.min(axis=0)))
    assert np.mean(np.linalg.norm(got - want, axis=1) <= 0.01 * extent) >= 0.95
    assert map_job.place_lists(map_job.PLACE_EXACT_MAX) == 0  # small samples: exhaustive


def test_a_map_past_the_exhaustive_size_places_through_ivf_lists(mapped, monkeypatch):
    monkeypatch.setattr(map_job, "PLACE_EXACT_MAX", 50)
    coll = mapped["collection"]
    compute_map(coll, sample=200, clusters=4, workers=0)
    ivf, exact = read_map(coll).to_pandas(), mapped["table"]
    assert ivf[S.KEY].tolist() == exact[S.KEY].tolist()
    xy = [S.MAP_X, S.MAP_Y]
    extent = float((exact[xy].max() - exact[xy].min()).max())
    dist = np.linalg.norm(ivf[xy].to_numpy() - exact[xy].to_numpy(), axis=1)
    assert np.sum(dist == 0) >= 200 and np.mean(dist <= 0.01 * extent) >= 0.9
    compute_map(coll, sample=200, clusters=4, workers=0)  # the fixture's map again


def test_uniqueness_is_a_joinable_table_and_copies_are_the_least_unique(insight_collection):
    coll = insight_collection["collection"]
    report = compute_uniqueness(coll, k=1)
    table = read_uniqueness(coll).to_pandas()
    assert list(table.columns) == list(S.UNIQUENESS_COLUMNS) and report["samples"] == len(table)
    assert table[S.ID].tolist() == list(range(len(table)))
    assert table[S.KEY].tolist() == list(read_keys(coll))
    assert table[S.UNIQUENESS].between(0, 1).all() and (table[S.KTH_DISTANCE] >= -1e-6).all()
    planted = np.array(
        [d is not None for d in read_metadata(coll, ["dup_of"]).column("dup_of").to_pylist()]
    )
    assert table[S.UNIQUENESS][planted].mean() < 0.5 * table[S.UNIQUENESS][~planted].mean()
    assert pq.read_table(S.InsightLayout(coll).uniqueness).num_rows == len(table)


def test_uniqueness_ranks_ties_together_and_its_index_method_needs_an_index(tmp_path):
    assert uniqueness_scores(np.array([0.1, 0.3, 0.1, np.nan])).tolist() == pytest.approx(
        [1 / 6, 2 / 3, 1 / 6, 1.0]
    )
    coll = write_collection(str(tmp_path / "c"), [clustered_vectors(30, 8, n_clusters=3)])
    with pytest.raises(CollectionError, match="no image index.*indices.build"):
        compute_uniqueness(coll, method="index", workers=0)
    with pytest.raises(ValueError, match="k must be at least 1"):
        compute_uniqueness(coll, k=0)
