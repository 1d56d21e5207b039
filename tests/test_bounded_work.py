"""The UI's actions whose cost must not grow with the collection (issue 25, `action_s_10m`):
Explore's histograms in two scans whatever their number, a where clause narrowing the rows
before it on sandbox workers that stay started, a concept fitted from a bounded sample and
ranked without the per-row scores leaving the process that scores, Explore's opening figures
made in the background as the collection opens."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest

from collection import schema as S
from collection.parts import read_metadata
from collection.sandbox import Limits, Source
from collection.sandbox_pool import SandboxPool
from curation.catalog import Catalog
from curation.concept_probe import (
    _unlabelled_ids,
    column_values,
    fit_concept,
    label_ids,
    ranking,
    score_collection,
    suggest,
)
from curation.context import ids_array, intersect, sandbox_catalog
from curation.resolve import StepCache, resolve
from curation.stats import HISTOGRAMS, histogram, histograms, overview
from curation.vectors import read_keys
from webui import state


class Counting:
    """A catalog that counts the queries asked of it."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog, self.queries = catalog, 0
        self.columns = catalog.columns

    def query(self, sql: str, *args, **kwargs):
        self.queries += 1
        return self.catalog.query(sql, *args, **kwargs)


def test_histograms_are_the_columns_truth_in_two_scans(demo_collection):
    coll = demo_collection["demo/collection"]
    columns = [c for c in HISTOGRAMS if c != S.PUNSAFE]  # the demo has no safety score
    with Catalog(coll) as cat:
        counting = Counting(cat)
        hists = histograms(counting, columns, bins=17)
        assert counting.queries == 2  # whatever the number of columns
        assert [h.column for h in hists] == columns
        for h in hists:
            assert h == histogram(cat, h.column, 17)  # one column alone, the same figures
        rows = cat.query(f"SELECT {S.CLIP_SIMILARITY}, {S.WIDTH}, {S.CAPTION} FROM samples").table
    by = {h.column: h for h in hists}
    lengths = [None if c is None else len(c) for c in rows.column(S.CAPTION).to_pylist()]
    for column, values in (
        (S.CLIP_SIMILARITY, rows.column(S.CLIP_SIMILARITY).to_pylist()),
        (S.WIDTH, rows.column(S.WIDTH).to_pylist()),
        ("caption_length", lengths),
    ):
        h = by[column]
        present = np.array([v for v in values if v is not None], dtype=float)
        assert h.total == rows.num_rows and h.missing == rows.num_rows - len(present)
        assert h.edges[0] == pytest.approx(present.min())
        top = present.max() if present.max() > present.min() else present.min() + 1  # one value
        assert h.edges[-1] == pytest.approx(top)
        truth, _ = np.histogram(present, bins=np.asarray(h.edges))
        assert h.counts == truth.tolist(), column  # numpy's last bin also holds the top edge
    score = by[S.PWATERMARK]
    assert score.edges[0] == 0.0 and score.edges[-1] == 1.0  # scores keep their unit range


def test_ids_and_intersections_through_a_bitmap_match_the_sorting_ones():
    rng = np.random.default_rng(3)
    for n, k in ((10_000_000, 6_000_000), (1000, 900), (10**12, 50), (5, 0)):
        a = rng.integers(0, n, k)
        b = rng.integers(0, n, k // 2 + 1)
        assert np.array_equal(ids_array(a), np.unique(a))
        ua, ub = np.unique(a), np.unique(b)
        assert np.array_equal(intersect(ua, ub), np.intersect1d(ua, ub))
        assert intersect(ua, ub).dtype == np.int64


def test_a_where_clause_narrows_the_rows_on_workers_that_stay_started(demo_collection):
    coll = demo_collection["demo/collection"]
    sandbox = sandbox_catalog(coll, workers=1)
    cache = StepCache()
    try:
        first = resolve(
            coll, {"where": ["width >= 64"]}, untrusted=True, cache=cache, sandbox=sandbox
        )
        pid = sandbox.worker_pid
        second = resolve(
            coll,
            {"where": ["width >= 64", "clip_similarity > 0.25"]},
            untrusted=True,
            cache=cache,
            sandbox=sandbox,
        )
        assert sandbox.worker_pid == pid is not None  # not closed by the resolve, not restarted
        assert cache.hits >= 1  # resumed from the first clause's rows
        full = resolve(coll, {"where": ["width >= 64", "clip_similarity > 0.25"]})
    finally:
        sandbox.close()
    assert np.array_equal(second.ids, full.ids)
    assert set(second.ids) <= set(first.ids) and 0 < len(second.ids) < len(first.ids)
    assert [s.count for s in second.steps[:2]] == [s.count for s in first.steps]


def test_a_pool_queries_on_the_worker_already_started():
    table = pa.table({"x": pa.array(range(10))})
    with SandboxPool([Source("t", table=table)], Limits(), "test", workers=2) as pool:
        pool.query("SELECT count(*) FROM t")
        started = [w.pid for w in pool.workers]
        pool.query("SELECT sum(x) FROM t")
        assert [w.pid for w in pool.workers] == started and started.count(None) == 1


def test_the_unlabelled_sample_is_bounded_and_never_labelled():
    labelled = np.array([5, 17, 10**11])
    got = _unlabelled_ids(10**12, labelled, 4096, seed=0)  # no array of 10**12 ids is made
    assert len(got) == 4096 and np.all(np.diff(got) > 0)
    assert not np.isin(got, labelled).any() and got.min() >= 0 and got.max() < 10**12
    assert np.array_equal(_unlabelled_ids(10, labelled[:2], 4096, 0), np.delete(np.arange(10), [5]))


def test_labels_and_scores_are_looked_up_by_joins(insight_collection):
    coll = insight_collection["collection"]
    keys = read_keys(coll)
    meta = read_metadata(coll, [S.PWATERMARK])
    with Catalog(coll) as cat:
        assert label_ids(cat, [keys[7], keys[3]], "labels").tolist() == [7, 3]
        with pytest.raises(ValueError, match="labels: unknown key nope"):
            label_ids(cat, [keys[1], "nope"], "labels")
        got = column_values(cat, np.array([9, 2, 4]), [S.PWATERMARK, "not_a_column"])
    assert list(got) == [S.PWATERMARK]
    want = meta.column(S.PWATERMARK).to_numpy(zero_copy_only=False)[[9, 2, 4]]
    assert np.allclose(got[S.PWATERMARK], want)


def test_the_ranking_is_the_full_sort_without_the_scores(insight_collection, tiny_clip):
    coll = insight_collection["collection"]
    keys = read_keys(coll)
    concept = fit_concept(coll, "ranked", list(keys[:4]), list(keys[4:8]), clip=tiny_clip)
    scores = score_collection(coll, concept)
    got = ranking(coll, concept, scores, top=12, near=6)
    order = np.argsort(-scores, kind="stable")[:12]
    assert [i for i, _ in got["top"]] == order.tolist()
    assert [s for _, s in got["top"]] == pytest.approx(scores[order].tolist())
    assert [keys[i] for i, _ in got["near"]] == suggest(concept, keys, scores, 6)
    assert got["above"] == int((scores >= concept.threshold).sum())
    assert got["rows"] == len(keys)


def test_explore_figures_are_made_as_a_collection_opens(demo_collection):
    coll = demo_collection["demo/collection"]
    # queryable, not searchable: the figures do not wait for an index to load
    loaded = state.Loaded(replace(state.inspect(coll), indices=()))
    try:
        figures = loaded.overview(state.insight_version(coll))
        with Catalog(coll, untrusted=True) as cat:
            assert figures == overview(cat, bins=state.EXPLORE_BINS)  # what the page would ask
        assert figures["histograms"] and figures["status"]
        assert loaded.overview(("a takedown list written since",)) is None  # stale: asked anew
    finally:
        loaded.catalog().close()
