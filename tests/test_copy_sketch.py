"""The copies level's local hashes (curation.copy_sketch): a cropped and an overlaid copy share
one with their original where the global perceptual hash does not, become candidate pairs
through the capped local-hash join, and are removed."""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from collection import schema as S
from collection.parts import read_metadata
from curation import copy_candidates as C
from curation.copies import phash_distance, thumbnail
from curation.copy_sketch import local_hashes
from curation.dedup import COPIES_WORK, dedup, read_duplicates
from curation.pictures import sketch_rows
from models.scenes import make_sample
from pipelines.near_duplicates import jpeg, make_copy
from pipelines.phash import phash


def _thumb(data: bytes) -> np.ndarray:
    return thumbnail(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def originals() -> list[bytes]:
    return [
        jpeg(make_sample(i, 64, seed=5, object_sizes=["small", "medium"]).image) for i in range(24)
    ]


@pytest.mark.parametrize("transform", ["cropped", "overlaid"])
def test_crops_and_overlays_share_a_local_hash_with_their_original(originals, transform):
    shared, far = [], 0
    for i, data in enumerate(originals[:12]):
        copy = make_copy(data, np.random.default_rng([transform == "cropped", i]), transform)[0]
        a, b = _thumb(data), _thumb(copy)
        shared.append(len(np.intersect1d(local_hashes(a), local_hashes(b))) > 0)
        far += phash_distance(phash(Image.fromarray(a)), phash(Image.fromarray(b))) > 7
    assert sum(shared) >= 10, shared
    if transform == "cropped":
        assert far >= 8  # what the banded phash index cannot find


def test_distinct_pictures_rarely_share_local_hashes(originals):
    hashes = [local_hashes(_thumb(d)) for d in originals]
    assert all(len(h) >= 1 for h in hashes)  # a shape on a flat ground has a few
    pairs = [(i, j) for i in range(len(hashes)) for j in range(i + 1, len(hashes))]
    sharing = sum(len(np.intersect1d(hashes[i], hashes[j])) > 0 for i, j in pairs)
    assert sharing <= len(pairs) // 20


def test_a_flat_picture_has_no_local_hashes():
    assert len(local_hashes(np.full((64, 64, 3), 128, np.uint8))) == 0
    assert len(local_hashes(np.zeros((5, 7, 3), np.uint8))) == 0


def test_local_pairs_skip_hashes_shared_by_too_many(tmp_path):
    # h=1: 3 pictures (kept under a cap of 3), h=2: 4 pictures (dropped), h=3: one picture
    ids = [0, 1, 2, 3, 4, 5, 6, 7, 8]
    hs = [1, 1, 1, 2, 2, 2, 2, 3, 1]
    sketch = str(tmp_path / "sketch.parquet")
    pq.write_table(pa.table({"id": ids[:8], "h": hs[:8]}), sketch)
    found = set()
    for part in range(4):
        out = str(tmp_path / f"local-{part}.parquet")
        assert C.local_pairs([sketch], out, part, 4, 3) == pq.read_metadata(out).num_rows
        table = pq.read_table(out)
        found |= set(zip(table["i"].to_pylist(), table["j"].to_pylist()))
    assert found == {(0, 1), (0, 2), (1, 2)}
    pq.write_table(pa.table({"id": ids, "h": hs}), sketch)  # h=1 now has 4: over the cap
    out = str(tmp_path / "local-1.parquet")
    assert C.local_pairs([sketch], out, 1, 4, 3) == 0


def _planted(collection: str, transforms: set[str]) -> list[tuple[int, int]]:
    """(original, copy) positions of the planted copies made by `transforms`."""
    meta = read_metadata(collection, [S.KEY, "dup_of", "transform"])
    index = {k: i for i, k in enumerate(meta.column(S.KEY).to_pylist())}
    rows = zip(meta.column("dup_of").to_pylist(), meta.column("transform").to_pylist())
    return [(index[d], c) for c, (d, t) in enumerate(rows) if d and t in transforms]


def test_cropped_and_overlaid_copies_are_candidates_and_removed(
    insight_collection, tmp_path, monkeypatch
):
    coll = insight_collection["collection"]
    planted = _planted(coll, {"cropped", "overlaid"})
    assert len(planted) >= 4
    # the candidates the local hashes alone propose
    meta = read_metadata(coll)
    rows = str(tmp_path / "rows.parquet")
    pq.write_table(C.rows_table(meta, np.arange(meta.num_rows)), rows)
    sketch = str(tmp_path / "sketch.parquet")
    counts = sketch_rows(rows, sketch, 0, meta.num_rows)
    assert counts["pictures"] == meta.num_rows and counts["unread"] == 0
    pairs = set()
    for part in range(C.LOCAL_PARTITIONS):
        out = str(tmp_path / f"local-{part}.parquet")
        C.local_pairs([sketch], out, part, C.LOCAL_PARTITIONS, C.LOCAL_MAX_SHARED)
        table = pq.read_table(out)
        pairs |= set(zip(table["i"].to_pylist(), table["j"].to_pylist()))
    found = [(min(o, c), max(o, c)) in pairs for o, c in planted]
    assert sum(found) >= len(planted) - 1, found
    # and the copies level removes them with the embedding neighbours nearly off
    monkeypatch.setattr(C, "COPY_NEIGHBOURS", 1)
    monkeypatch.setattr(C, "COPY_MIN_COSINE", 0.999)
    dedup(coll, S.LEVEL_COPIES, workers=0, run="sketch-only", keep_work=True)
    work = os.path.join(S.InsightLayout(coll).dedup_run("sketch-only"), COPIES_WORK)
    planned = pa.concat_tables(
        [pq.read_table(os.path.join(work, f)) for f in os.listdir(work) if f.startswith("pairs-")]
    )
    planned_pairs = set(zip(planned["i"].to_pylist(), planned["j"].to_pylist()))
    assert {(min(o, c), max(o, c)) for (o, c), f in zip(planted, found) if f} <= planned_pairs
    table = read_duplicates(coll, run="sketch-only")
    keys = meta.column(S.KEY).to_pylist()
    group = dict(zip(table.column(S.DUP_KEY).to_pylist(), table.column(S.DUP_GROUP).to_pylist()))
    removed = [
        keys[c] in group and group[keys[c]] == group.get(keys[o])
        for (o, c), f in zip(planted, found)
        if f
    ]
    assert removed and all(removed), removed
