"""Uniqueness by lists (`curation.uniqueness_lists`): with every list a neighbour of every list it
is the exact k-NN of brute force, from an IVF index's centroids or a k-means of its own; fewer
neighbour lists only ever find a farther k-th neighbour; the plan and the running top k hold
their rules."""

from __future__ import annotations

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.synthetic import write_vector_collection
from collection import schema as S
from collection.parts import CollectionError
from curation import uniqueness_lists as U
from curation.uniqueness import compute_uniqueness, uniqueness_scores
from curation.vector_jobs import TaskFolder
from curation.vectors import open_store, read_rows
from indices.build import build

K = 5


def _exact_kth(root: str, k: int) -> np.ndarray:
    """1 - the cosine to each row's k-th nearest other row, by brute force over all rows."""
    store = open_store(root)
    x = read_rows(store, np.arange(store.count))
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    return np.maximum(1.0 - np.sort(sims, axis=1)[:, -k], 0.0)


@pytest.fixture(scope="module")
def coll(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("ulists") / "c")
    write_vector_collection(root, 1200, 3, 24, n_clusters=12)
    return root


def _table(root: str):
    return pq.read_table(S.InsightLayout(root).uniqueness).to_pandas()


def test_every_list_as_a_neighbour_gives_the_exact_knn_of_brute_force(coll):
    report = compute_uniqueness(coll, k=K, workers=0, neighbour_lists=1000, task_rows=300)
    # 4 lists of ~256 rows: a k-means of 2 on a sample, each split in two
    assert report["centroids"] == "kmeans+split" and report["lists"] > 1
    assert report["tasks"] > 3 + 1  # the parts' assign tasks and several group tasks
    table = _table(coll)
    exact = _exact_kth(coll, K)
    assert table[S.ID].tolist() == list(range(len(exact)))
    np.testing.assert_allclose(table[S.KTH_DISTANCE], exact, atol=1e-6)
    np.testing.assert_allclose(table[S.UNIQUENESS], uniqueness_scores(exact), atol=2 / len(exact))


def test_an_ivf_index_lends_its_coarse_centroids_and_stays_exact_with_every_list(tmp_path):
    root = str(tmp_path / "c")
    write_vector_collection(root, 900, 3, 16, n_clusters=8)
    build(root, modality="image", index_key="IVF8,Flat")
    report = compute_uniqueness(root, k=K, workers=0, neighbour_lists=8, task_rows=300)
    assert (report["centroids"], report["lists"]) == ("index", 8)
    np.testing.assert_allclose(_table(root)[S.KTH_DISTANCE], _exact_kth(root, K), atol=1e-6)


def test_an_index_with_fewer_lists_than_the_rows_call_for_has_them_split(tmp_path, monkeypatch):
    monkeypatch.setattr(U, "LIST_ROWS", 60)  # 900 rows: 15 lists of ~60 rows, the index has 4
    root = str(tmp_path / "c")
    write_vector_collection(root, 900, 3, 16, n_clusters=8)
    build(root, modality="image", index_key="IVF4,Flat")
    report = compute_uniqueness(root, k=K, workers=0, neighbour_lists=1000, task_rows=200)
    assert report["centroids"] == "index+split" and 10 <= report["lists"] <= 20
    np.testing.assert_allclose(_table(root)[S.KTH_DISTANCE], _exact_kth(root, K), atol=1e-6)


def test_a_group_task_reads_only_the_row_groups_holding_its_lists(tmp_path, monkeypatch):
    folder = TaskFolder(str(tmp_path), {})
    lists = np.repeat(np.arange(6), 5)
    table = pa.table({U.LIST: lists, S.ID: np.arange(30), S.KEY: [f"k{i}" for i in range(30)]})
    U.write_by_lists(folder, "part", table, np.array([0, 10, 20]))  # lists 0-1, 2-3, 4-5
    assert pq.ParquetFile(folder.output("part")).metadata.num_row_groups == 3
    got = U._rows_of_lists(folder.output("part"), np.array([1, 4]))
    assert got.column(S.ID).to_pylist() == [5, 6, 7, 8, 9, 20, 21, 22, 23, 24]
    read = []
    monkeypatch.setattr(
        pq.ParquetFile,
        "read_row_groups",
        lambda self, groups, **kw: read.append(groups) or pq.read_table(folder.output("part")),
    )
    U._rows_of_lists(folder.output("part"), np.array([2, 3]))
    assert read == [[1]]  # lists 2-3: the middle row group alone
    monkeypatch.undo()
    # its footer is kept per process, but a rewritten file is read anew, not from the old one
    U.write_by_lists(folder, "part", table.slice(10), np.array([0, 10]))  # lists 2-3, 4-5
    got = U._rows_of_lists(folder.output("part"), np.array([1, 2, 4]))
    assert got.column(S.ID).to_pylist() == [10, 11, 12, 13, 14, 20, 21, 22, 23, 24]
    folder.write("old", table)  # written without the row groups' lists: refused, not misread
    with pytest.raises(CollectionError, match="old.parquet: no sieve_first_lists"):
        U._rows_of_lists(folder.output("old"), np.array([1]))


def test_fewer_neighbour_lists_only_find_farther_kth_neighbours(coll):
    report = compute_uniqueness(coll, k=K, workers=0, neighbour_lists=1, task_rows=300)
    assert report["neighbour_lists"] == 1
    kth = _table(coll)[S.KTH_DISTANCE].to_numpy()
    exact = _exact_kth(coll, K)
    found = np.isfinite(kth)  # a list of fewer than k + 1 rows leaves its rows without one
    assert (kth[found] >= exact[found] - 1e-6).all()
    assert np.isclose(kth[found], exact[found], atol=1e-3).mean() < 1.0  # borders lose some


def test_the_plan_puts_each_list_first_among_its_nearest_and_groups_cover_every_list():
    rng = np.random.default_rng(0)
    centroids = rng.normal(size=(40, 8)).astype(np.float32)
    ordered, near, bounds = U.plan_lists(centroids, 4, 5)
    assert sorted(map(tuple, ordered.tolist())) == sorted(map(tuple, centroids.tolist()))
    assert (near[:, 0] == np.arange(40)).all()
    dist = ((ordered[:, None] - ordered[None]) ** 2).sum(-1)
    expect = np.sort(dist, axis=1)[:, :4]
    np.testing.assert_allclose(np.take_along_axis(dist, near, axis=1), expect, rtol=1e-5)
    assert bounds[0] == 0 and bounds[-1] == 40 and (np.diff(bounds) > 0).all()


def test_the_running_top_k_over_blocks_matches_a_full_sort(monkeypatch):
    monkeypatch.setattr(U, "BLOCK", 7)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 6)).astype(np.float32)
    ids = np.arange(100, 150)
    pos, sims = U.top_k(x[:20], ids[:20], x, ids, 4)
    full = x[:20] @ x.T
    full[np.arange(20), np.arange(20)] = -np.inf  # itself is never its own neighbour
    np.testing.assert_allclose(np.sort(sims, axis=1), np.sort(full, axis=1)[:, -4:], rtol=1e-6)
    assert not (pos == np.arange(20)[:, None]).any()
    few, few_sims = U.top_k(x[:3], ids[:3], x[:3], ids[:3], 4)  # two others: no 3rd or 4th
    assert ((few >= 0).sum(axis=1) == 2).all() and np.isinf(few_sims).sum() == 6


def test_bad_neighbour_lists_are_refused_in_one_line(coll):
    with pytest.raises(ValueError, match="neighbour lists"):
        compute_uniqueness(coll, workers=0, neighbour_lists=0)
    with pytest.raises(ValueError, match="method: unknown 'nearest'"):
        compute_uniqueness(coll, workers=0, method="nearest")


def test_lists_split_from_coarse_ones_are_assigned_through_them_as_the_nearest_list():
    rng = np.random.default_rng(2)
    coarse = rng.normal(size=(16, 8)).astype(np.float32)
    subs = np.repeat(coarse, 4, axis=0) + 0.3 * rng.normal(size=(64, 8)).astype(np.float32)
    rows = np.repeat(subs, 20, axis=0) + 0.1 * rng.normal(size=(1280, 8)).astype(np.float32)
    index = U.open_assigner(U.assigner(subs, coarse))
    assert isinstance(faiss.try_extract_index_ivf(index), faiss.IndexIVF)
    exact = ((rows[:, None] - subs[None]) ** 2).sum(-1).argmin(axis=1)
    assert (index.search(rows, 1)[1][:, 0] == exact).mean() > 0.95
    splits = U.split_lists(index)  # by matrix products per coarse list: the same lists
    assert sorted(np.concatenate(splits.ids).tolist()) == list(range(64))
    assert (splits.near[:, 0] == np.arange(16)).all()
    assert (U.assign_rows(index, rows, splits) == exact).mean() > 0.95
    flat = U.open_assigner(U.assigner(subs))
    assert U.split_lists(flat) is None
    np.testing.assert_array_equal(U.assign_rows(flat, rows, None), exact)


def test_a_list_meets_at_most_the_cap_of_candidates_the_nearest_to_it(coll, monkeypatch):
    """Uneven lists would make a row's work grow with the collection: capped, the k-th distance
    is found among the candidates nearest the list, never nearer than the exact one."""
    monkeypatch.setattr(U, "LIST_ROWS", 40)  # 1200 rows in ~30 lists; 2 neighbours: at most 80
    seen = []
    top_k = U.top_k
    monkeypatch.setattr(
        U, "top_k", lambda q, qi, x, xi, k: seen.append(len(x)) or top_k(q, qi, x, xi, k)
    )
    report = compute_uniqueness(coll, k=K, workers=0, neighbour_lists=2, task_rows=300)
    assert report["lists"] > 20 and max(seen) == 80 and min(seen) < 80
    assert 0 < report["candidates_per_row"] <= 80
    kth = _table(coll)[S.KTH_DISTANCE].to_numpy()
    exact = _exact_kth(coll, K)
    assert (kth >= exact - 1e-6).all() and np.isclose(kth, exact, atol=1e-3).mean() > 0.5


def test_many_lists_find_their_nearest_lists_through_an_ivf(monkeypatch):
    """All pairs of centroids grow with the square of the collection: past EXACT_NEAR_MAX the
    nearest lists come from an IVF over the centroids, and agree with all pairs."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(20, 16)).astype(np.float32)
    centroids = np.repeat(centres, 30, axis=0) + 0.2 * rng.normal(size=(600, 16)).astype(np.float32)
    exact = U.nearest_centroids(centroids, 4)[1]
    monkeypatch.setattr(U, "EXACT_NEAR_MAX", 100)
    got = U.nearest_centroids(centroids, 4)[1]
    found = np.mean([len(set(a) & set(b)) / 4 for a, b in zip(got, exact)])
    assert found > 0.95
