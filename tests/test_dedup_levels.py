"""Dedup levels run alone or several at once; synthetic collections dedup at every level; a bad
phash is a one-line error naming its part file and row."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from bench.synthetic import write_vector_collection
from collection import schema as S
from collection.parts import CollectionError, read_metadata
from curation import dedup_stages, pictures
from curation.dedup import dedup, main as dedup_main, read_duplicates, subset_clause
from curation.semdedup import SemanticParams
from curation.vectors import open_store
from indices.build import build

PARAMS = SemanticParams(group_size=400, leaf_size=100)


def _no_pictures(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every picture reader raises: a stage that reads one fails the test."""

    def refuse(*_a, **_k):
        raise AssertionError("a picture was read")

    for module, name in (
        (pictures, "thumbnails"),
        (pictures, "read_images"),
        (pictures, "check_pairs"),
        (dedup_stages, "check_pairs"),
    ):
        monkeypatch.setattr(module, name, refuse)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, insight_collection) -> str:
    """Clustered rows from bench.synthetic (2 parts), one per distinct picture of the insight
    collection (the same keys, shards and sha256), with an image index: every level can run."""
    meta = read_metadata(
        insight_collection["collection"],
        [S.KEY, S.SOURCE_SHARD, S.SOURCE_OFFSET, S.SOURCE_SIZE, S.SHA256],
    )
    # one picture of each of its duplicate groups: no exact duplicates or copies here
    dedup(insight_collection["collection"], "exact,copies", workers=0)
    dups = read_duplicates(insight_collection["collection"], "exact,copies")
    removed = pc.filter(dups.column(S.DUP_KEY), pc.invert(dups.column(S.DUP_KEPT)))
    meta = meta.filter(pc.invert(pc.is_in(meta.column(S.KEY), removed)))
    root = str(tmp_path_factory.mktemp("synthetic") / "coll")
    write_vector_collection(root, meta.num_rows, 2, 32, n_clusters=8, sources=meta)
    build(root, max_index_memory="50M", modality="image")
    return root


def test_semantic_alone_reads_no_picture_and_equals_the_cumulative_semantic_groups(
    synthetic, monkeypatch
):
    _no_pictures(monkeypatch)
    alone = dedup(synthetic, S.LEVEL_SEMANTIC, eps=0.1, workers=0, params=PARAMS)
    assert alone["levels"] == ["semantic"] and "copies" not in alone and "exact" not in alone
    assert alone["removed"] == alone["removed_by_reason"]["semantic"] > 0
    # no exact duplicates or copies here: the cumulative run removes the same rows
    monkeypatch.undo()
    every = dedup(synthetic, "exact,copies,semantic", eps=0.1, workers=0, params=PARAMS)
    assert every["run"] == "exact-copies-semantic-eps0.1" and every["copies"]["pictures_read"]
    assert every["removed_by_reason"]["exact"] == every["removed_by_reason"]["copy"] == 0
    a = read_duplicates(synthetic, S.LEVEL_SEMANTIC, 0.1)
    b = read_duplicates(synthetic, "exact,copies,semantic", 0.1)
    assert a.equals(b) and set(a.column(S.DUP_REASON).to_pylist()) == {S.REASON_SEMANTIC}


def test_a_synthetic_collection_dedups_at_every_level(synthetic):
    for level in (S.LEVEL_EXACT, S.LEVEL_COPIES, S.LEVEL_SEMANTIC, "exact,copies,semantic"):
        report = dedup(synthetic, level, workers=0, params=PARAMS)
        table = read_duplicates(synthetic, level)
        assert report["removed"] == int((~table.column(S.DUP_KEPT).to_numpy()).sum())
        assert pq.read_table(S.InsightLayout(synthetic).duplicates(report["run"])).equals(table)
    copies = dedup(synthetic, S.LEVEL_COPIES, workers=0, run="copies-again")
    # candidates from the phash and image neighbours, their pictures read back and compared
    assert copies["copies"]["candidate_pairs"] > 0 and copies["copies"]["pictures_read"] > 0


def test_several_levels_at_once_equal_the_cumulative_chain(insight_collection, tmp_path):
    coll = insight_collection["collection"]
    chain = dedup(coll, "semantic,exact,copies", eps=0.1, workers=0)
    assert chain["run"] == "exact-copies-semantic-eps0.1"
    # the old cumulative `--level semantic`: each stage on what the ones before it kept
    meta = read_metadata(
        coll,
        [S.KEY, S.PART, S.ROW, S.SHA256, S.PHASH, S.WIDTH, S.HEIGHT]
        + [S.CLIP_SIMILARITY, S.SOURCE_SHARD],
    )
    store, ranks = open_store(coll, S.MODALITY_IMAGE), dedup_stages.keep_ranks(meta)
    links, local = dedup_stages.Links(meta.num_rows), lambda fn, args: [fn(*a) for a in args]
    dedup_stages.exact_stage(meta, ranks, links, store)
    dedup_stages.copies_stage(coll, meta, ranks, links, store, local, str(tmp_path / "work"))
    dedup_stages.semantic_stage(coll, ranks, links, store, 0.1, local, SemanticParams())
    keys = np.asarray(meta.column(S.KEY).to_pylist(), dtype=object)
    assert dedup_stages.duplicate_rows(links, keys).equals(
        read_duplicates(coll, "exact,copies,semantic", 0.1)
    )
    assert chain["levels"] == [S.LEVEL_EXACT, S.LEVEL_COPIES, S.LEVEL_SEMANTIC]
    first_two = dedup(coll, "exact,copies", workers=0)
    exact = dedup(coll, S.LEVEL_EXACT, workers=0)
    table = read_duplicates(coll, "exact,copies,semantic", 0.1).to_pandas()
    earlier = read_duplicates(coll, "exact,copies").to_pandas()
    # later levels run on what earlier ones kept: they add rows, never change an earlier removal
    removed = lambda t, reasons: set(  # noqa: E731
        t[~t[S.DUP_KEPT] & t[S.DUP_REASON].isin(reasons)][S.DUP_KEY]
    )
    assert removed(table, {"exact", "copy"}) == removed(earlier, {"exact", "copy"})
    assert chain["exact"]["removed"] == first_two["exact"]["removed"] == exact["removed"]
    assert chain["removed_by_reason"]["copy"] == first_two["removed_by_reason"]["copy"] > 0
    assert chain["removed_by_reason"]["semantic"] > 0
    # copies alone also groups the exact duplicates (the same picture), as copies
    alone = dedup(coll, S.LEVEL_COPIES, workers=0, run="copies-alone")
    assert alone["removed"] == alone["removed_by_reason"]["copy"] >= first_two["removed"] - 1
    # the subset clause reads the run of exactly the levels it names
    ids = list(range(len(read_metadata(coll, [S.KEY]))))
    assert len(subset_clause(coll, ids, "exact,copies,semantic", 0.1)) == len(ids) - len(
        removed(table, {"exact", "copy", "semantic"})
    )


def test_a_bad_phash_names_its_part_file_and_row(tmp_path, capsys):
    root = str(tmp_path / "coll")
    # a local source shard, so nothing here reaches for a remote store
    local = pa.table({S.SOURCE_SHARD: [str(tmp_path / "gone.tar")]})
    write_vector_collection(root, 200, 2, 16, n_clusters=4, sources=local)
    path = S.CollectionLayout(root).metadata(1)
    table = pq.read_table(path)
    phash = table.column(S.PHASH).to_pylist()
    row = next(r for r, e in enumerate(table.column(S.EMB_ROW).to_pylist()) if r > 5 and e)
    phash[row] = "0000001234567890123"  # decimal digits, too many: the old synthetic writer's
    i = table.schema.get_field_index(S.PHASH)
    pq.write_table(table.set_column(i, S.PHASH, pa.array(phash, pa.string())), path)
    build(root, max_index_memory="50M", modality="image")
    with pytest.raises(CollectionError, match=rf"{path}: row {row}: phash '0000001234567890123'"):
        dedup(root, S.LEVEL_COPIES, workers=0)
    with pytest.raises(SystemExit):
        dedup_main([root, "--level", "copies", "--workers", "0"])
    err = capsys.readouterr().err
    assert f"{path}: row {row}" in err and "Traceback" not in err
    # the other levels do not read the phash
    assert dedup(root, "exact,semantic", workers=0)["samples"] > 0


def test_unknown_levels_are_refused(synthetic):
    with pytest.raises(ValueError, match="level must be one of .* got 'fuzzy'"):
        dedup(synthetic, "exact,fuzzy", workers=0)
    with pytest.raises(ValueError, match="one or more"):
        dedup(synthetic, ",", workers=0)
