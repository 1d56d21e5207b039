"""Duplicates: exact, copies and SemDeDup levels against planted truth; reruns, Dask,
the subset clause, bad input."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from bench.synthetic import clustered_vectors, write_collection
from collection import schema as S
from collection.parts import CollectionError, read_metadata
from curation.dedup import dedup, keep_ranks, read_duplicates, subset_clause
from curation.semdedup import (
    EPS_TABLE,
    ArrayVectors,
    SemanticParams,
    group_links,
    leaf_links,
    removed_mask,
    root_groups,
)

#: the exact and copies levels together (each level alone would call exact duplicates copies)
EXACT_COPIES = "exact,copies"


def _truth(collection: str) -> tuple[np.ndarray, np.ndarray]:
    """(keys, each sample's true original's position: itself unless planted as a copy)."""
    meta = read_metadata(collection, [S.KEY, "dup_of"])
    keys = np.asarray(meta.column(S.KEY).to_pylist(), dtype=object)
    index = {k: i for i, k in enumerate(keys)}
    root = np.array([index[d] if d else i for i, d in enumerate(meta.column("dup_of").to_pylist())])
    return keys, root


@pytest.fixture(scope="module")
def copies_run(insight_collection) -> tuple[str, dict]:
    coll = insight_collection["collection"]
    return coll, dedup(coll, EXACT_COPIES, workers=0)


def test_planted_copies_are_found_and_distinct_samples_kept(copies_run):
    coll, report = copies_run
    keys, root = _truth(coll)
    table = read_duplicates(coll, EXACT_COPIES).to_pandas()
    group = {k: g for k, g in zip(table[S.DUP_KEY], table[S.DUP_GROUP])}
    planted = np.nonzero(root != np.arange(len(root)))[0]
    found = [i for i in planted if keys[i] in group and group.get(keys[root[i]]) == group[keys[i]]]
    assert len(planted) >= 20 and len(found) >= 0.9 * len(planted)
    # every group joins a planted copy with its original: nothing distinct is removed
    for _group, members in table.groupby(S.DUP_GROUP)[S.DUP_KEY]:
        assert len({root[np.nonzero(keys == k)[0][0]] for k in members}) == 1, members.tolist()
    assert report["removed"] == int((~table[S.DUP_KEPT]).sum()) == len(found)
    assert set(table[S.DUP_REASON]) <= {S.REASON_EXACT, S.REASON_COPY}
    assert (table.groupby(S.DUP_GROUP)[S.DUP_KEPT].sum() == 1).all()  # one kept per group


def test_rows_say_why_and_name_their_nearest_member(copies_run):
    coll, _ = copies_run
    table = read_duplicates(coll, EXACT_COPIES).to_pandas()
    assert list(table.columns) == list(S.DUPLICATES_COLUMNS)
    exact = table[table[S.DUP_REASON] == S.REASON_EXACT]
    assert len(exact) and (exact[S.DUP_SIMILARITY] > 0.99).all()
    by_group = table.groupby(S.DUP_GROUP)[S.DUP_KEY].apply(set)
    for _, row in table.iterrows():
        assert row[S.DUP_NEAREST] in by_group[row[S.DUP_GROUP]] - {row[S.DUP_KEY]}


def test_the_keep_rule_prefers_more_pixels_then_image_text_similarity():
    import pyarrow as pa

    meta = pa.table(
        {
            S.WIDTH: [64, 96, 64, None],
            S.HEIGHT: [64, 96, 64, None],
            S.CLIP_SIMILARITY: [0.2, 0.1, 0.3, 0.9],
        }
    )
    assert keep_ranks(meta).tolist() == [2, 0, 1, 3]


def test_reruns_and_the_dask_cluster_give_identical_groups(copies_run, tmp_path):
    coll, _ = copies_run
    first = read_duplicates(coll, EXACT_COPIES)
    dedup(coll, S.LEVEL_SEMANTIC, eps=0.05, workers=0, run="again-1")
    dedup(coll, S.LEVEL_SEMANTIC, eps=0.05, workers=0, run="again-2")
    layout = S.InsightLayout(coll)
    a, b = pq.read_table(layout.duplicates("again-1")), pq.read_table(layout.duplicates("again-2"))
    assert a.equals(b)
    # a LocalCluster: one task per shard / pair chunk
    dedup(coll, EXACT_COPIES, workers=1, run="on-dask")
    assert pq.read_table(layout.duplicates("on-dask")).equals(first)


def test_semantic_level_adds_semdedup_groups_and_reports_every_eps(insight_collection):
    coll = insight_collection["collection"]
    small = dedup(coll, S.LEVEL_SEMANTIC, eps=0.01, workers=0)
    large = dedup(coll, S.LEVEL_SEMANTIC, eps=0.2, workers=0)
    # larger eps removes more
    assert large["removed"] > small["removed"] >= small["removed_by_reason"]["copy"]
    table = read_duplicates(coll, S.LEVEL_SEMANTIC, 0.2).to_pandas()
    semantic = table[table[S.DUP_REASON] == S.REASON_SEMANTIC]
    assert len(semantic) and (semantic[~semantic[S.DUP_KEPT]][S.DUP_SIMILARITY] > 0.8).all()
    fractions = large["semantic"]["removed_fraction_by_eps"]
    assert [fractions[f"{e:g}"] for e in EPS_TABLE] == sorted(
        fractions[f"{e:g}"] for e in EPS_TABLE
    )
    assert (S.InsightLayout(coll).dedup_report("semantic-eps0.2")).endswith("report.json")


def test_subset_clause_keeps_one_member_of_each_group_within_the_subset(copies_run):
    coll, _ = copies_run
    table = read_duplicates(coll, EXACT_COPIES).to_pandas()
    keys = _truth(coll)[0]
    pos = {k: i for i, k in enumerate(keys)}
    everything = np.arange(len(keys))
    kept = subset_clause(coll, everything, EXACT_COPIES)
    removed = {pos[k] for k in table[~table[S.DUP_KEPT]][S.DUP_KEY]}
    assert set(kept) == set(everything) - removed
    # drop a group's kept member from the subset: another member of its group stands in
    g0 = table[table[S.DUP_GROUP] == 0]
    kept_key = g0[g0[S.DUP_KEPT]][S.DUP_KEY].iloc[0]
    subset = np.array([i for i in everything if keys[i] != kept_key])
    got = subset_clause(coll, subset, EXACT_COPIES)
    assert len(set(got) & {pos[k] for k in g0[S.DUP_KEY]}) == 1


def test_semdedup_follows_the_code_eps_convention_and_compares_only_earlier_members():
    x = clustered_vectors(400, 32, n_clusters=5, spread=0.3, seed=2)
    x[200:220] = x[:20] + 0.001  # near copies of the first twenty
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    best, arg = leaf_links(x, block=64)
    sims = x @ x.T
    for j in (1, 57, 205, 399):
        assert (
            best[j] == pytest.approx(sims[:j, j].max(), abs=1e-5) and arg[j] == sims[:j, j].argmax()
        )
    assert best[0] == -np.inf and arg[0] == -1
    assert (
        removed_mask(best, 0.01)[200:220].all()
        and removed_mask(best, 0.3).sum() >= removed_mask(best, 0.01).sum()
    )
    ids, sim, nearest = group_links(x, np.arange(400), np.arange(400), SemanticParams(leaf_size=50))
    assert (nearest[200:220] == np.arange(20)).all() and (sim[200:220] > 0.99).all()
    groups = root_groups(ArrayVectors(x), np.arange(400), SemanticParams(group_size=100))
    assert sorted(np.concatenate(groups).tolist()) == list(range(400)) and len(groups) > 1


@pytest.mark.parametrize("eps", [0.0, 1.0, -0.1, 1.5])
def test_eps_outside_zero_one_is_refused(insight_collection, eps):
    with pytest.raises(ValueError, match=r"eps must be in \(0, 1\)"):
        dedup(insight_collection["collection"], S.LEVEL_SEMANTIC, eps=eps, workers=0)


def test_bad_collections_and_levels_get_one_line_errors(tmp_path, insight_collection):
    with pytest.raises(ValueError, match="level must be one of"):
        dedup(insight_collection["collection"], "fuzzy", workers=0)
    with pytest.raises(CollectionError, match="no such collection"):
        dedup(str(tmp_path / "nowhere"), S.LEVEL_EXACT, workers=0)
    bare = write_collection(str(tmp_path / "bare"), [clustered_vectors(20, 8, n_clusters=2)])
    shutil.rmtree(S.CollectionLayout(bare).img_emb_dir)
    with pytest.raises(CollectionError, match="no image embeddings"):
        dedup(bare, S.LEVEL_EXACT, workers=0)
    unindexed = write_collection(
        str(tmp_path / "unindexed"), [clustered_vectors(20, 8, n_clusters=2)]
    )
    with pytest.raises(CollectionError, match="no image index.*indices.build"):
        dedup(unindexed, S.LEVEL_COPIES, workers=0)
    done = subprocess.run(
        [sys.executable, "-m", "curation.dedup", unindexed, "--level", "semantic", "--eps", "2"],
        capture_output=True,
        text=True,
    )
    assert (
        done.returncode == 2
        and "eps must be in (0, 1)" in done.stderr
        and "Traceback" not in done.stderr
    )
