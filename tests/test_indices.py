"""indices: key selection, build + json record, reload + search, takedown, dedup, filters."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from bench.synthetic import clustered_vectors, write_collection, write_takedown
from collection import schema as S
from indices.select import choose_index, parse_bytes

DIM = 32


@pytest.mark.parametrize(
    "n,budget,expect",
    [
        (1_000, "4G", "Flat"),
        (10_000, "8M", "SQ8"),
        (10_000, "2M", "IVF256,PQ64x8"),  # SQ8 (5 MB) misses the budget: PQ codes + exact re-rank
        (100_000, "4G", "HNSW32"),
        (1_000_000, "4G", "IVF4096,Flat"),
        (1_000_000, "200M", "IVF4096,PQ128x8"),  # 128 sub-quantizers at most
        # 32,768 lists would train on 2.6 GB: halved until the sample fits max(budget / 4, 1 GiB)
        (50_000_000, "2G", "IVF8192_HNSW32,PQ32x8"),
    ],
)
def test_choose_index_by_size_and_budget(n, budget, expect):
    c = choose_index(n, 512, budget)
    assert c.index_key == expect
    assert c.estimated_bytes <= parse_bytes(budget)
    assert c.rerank == ("PQ" in expect)


def test_choose_index_refuses_impossible_budget():
    with pytest.raises(ValueError, match="max-index-memory"):
        choose_index(10_000_000, 512, "1M")


def test_parse_bytes():
    assert (
        parse_bytes("4G") == 4 * 2**30
        and parse_bytes("100M") == 100 * 2**20
        and parse_bytes(512) == 512
    )
    with pytest.raises(ValueError):
        parse_bytes("lots")


@pytest.fixture(scope="module")
def coll(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("coll"))
    parts = [clustered_vectors(1500, DIM, 40, seed=i) for i in range(2)]
    # plant near-duplicates of vector 0 at the start of part 1
    base = parts[0][0]
    for j in range(3):
        parts[1][j] = base + np.random.default_rng(j).standard_normal(DIM) * 0.01
    text = [clustered_vectors(1500, DIM, 40, seed=10 + i, spread=0.8) for i in range(2)]
    n = 3000
    punsafe = [0.9 if i % 7 == 0 else 0.1 for i in range(n)]
    write_collection(root, parts, text, columns={S.PUNSAFE: punsafe}, failed_per_part=5)
    return root


def test_build_flat_records_recall_and_round_trips(coll):
    from indices.build import build
    from indices.search import Searcher

    docs = build(coll, modality="image,text")
    assert set(docs) == {"image", "text"}
    layout = S.CollectionLayout(coll)
    rec = json.load(open(layout.index_json("image")))
    assert rec["index_key"] == "Flat" and rec["recall_at_10"] == pytest.approx(1.0)
    assert rec["count"] == 3000 and rec["index_bytes"] == os.path.getsize(layout.index("image"))
    assert not [f for f in os.listdir(layout.indices_dir) if ".tmp" in f]
    s = Searcher(coll)
    q = np.load(layout.img_emb(1), mmap_mode="r")[100].astype(np.float32)
    rows = s.query(embedding=q, k=5, deduplicate=False)
    assert rows[0]["id"] == 1500 + 100 and rows[0]["similarity"] == pytest.approx(1.0, abs=1e-3)
    assert rows[0][S.KEY] == "001000100"
    assert [r["similarity"] for r in rows] == sorted((r["similarity"] for r in rows), reverse=True)


@pytest.mark.parametrize("key", ["IVF16,Flat", "IVF16,PQ8x4", "HNSW16"])
def test_forced_keys_tune_and_reach_recall(coll, key):
    from indices.build import build_one
    from indices.search import Searcher

    doc = build_one(coll, "image", index_key=key, target_recall=0.9)
    assert doc["index_key"] == key
    assert doc["recall_at_10"] >= 0.9, doc["sweep"]
    assert doc["sweep"] and all("recall_at_10" in r for r in doc["sweep"])
    if "PQ" in key:
        assert doc["rerank"] and doc["bytes_read_per_query"] == doc["params"]["rerank_k"] * DIM * 2
    s = Searcher(coll)
    q = np.load(S.CollectionLayout(coll).img_emb(0), mmap_mode="r")[200].astype(np.float32)
    assert s.query(embedding=q, k=3, deduplicate=False)[0]["id"] == 200


def test_dedup_collapses_planted_duplicates(coll):
    from indices.search import Searcher

    s = Searcher(coll)
    q = np.load(S.CollectionLayout(coll).img_emb(0), mmap_mode="r")[0].astype(np.float32)
    plain = [r["id"] for r in s.query(embedding=q, k=10, deduplicate=False)]
    assert {0, 1500, 1501, 1502} <= set(plain[:4])
    dedup = [r["id"] for r in s.query(embedding=q, k=10, deduplicate=True)]
    assert len({0, 1500, 1501, 1502} & set(dedup)) == 1 and len(dedup) == 10


def test_safe_mode_and_sql_filters(coll):
    from indices.search import QueryError, Searcher

    s = Searcher(coll)
    q = np.load(S.CollectionLayout(coll).img_emb(0), mmap_mode="r")[7].astype(np.float32)
    rows = s.query(embedding=q, k=20, safe_mode=True, deduplicate=False)
    assert (
        len(rows) == 20
        and all(r[S.PUNSAFE] <= 0.5 for r in rows)
        and 7 not in [r["id"] for r in rows]
    )
    rows = s.query(embedding=q, k=10, filters="part = 1 AND emb_row % 2 = 0", deduplicate=False)
    assert len(rows) == 10 and all(r["id"] >= 1500 and (r["id"] - 1500) % 2 == 0 for r in rows)
    with pytest.raises(QueryError):
        s.query(embedding=q, filters="1=1; DROP TABLE candidates")
    with pytest.raises(QueryError):
        s.query(embedding=q, filters="no_such_column > 3")
    with pytest.raises(QueryError):
        s.query(embedding=q, filters="key IN (SELECT * FROM read_csv('/etc/passwd'))")
    with pytest.raises(QueryError, match="dimension"):
        s.query(embedding=[1.0, 0.0])


def test_takedown_never_returned(coll, tmp_path):
    import shutil

    from indices.search import Searcher

    root = str(tmp_path / "c")
    shutil.copytree(coll, root)
    layout = S.CollectionLayout(root)
    q = np.load(layout.img_emb(0), mmap_mode="r")[3].astype(np.float32)
    s0 = Searcher(root)
    before = s0.query(embedding=q, k=10, deduplicate=False)
    banned_key, banned_url = before[0][S.KEY], before[1][S.URL]
    banned_sha = s0.records([before[2]["id"]])[0][S.SHA256]
    write_takedown(root, keys=[banned_key], urls=[banned_url], sha256=[banned_sha])
    s = Searcher(root)
    after = s.query(embedding=q, k=10, deduplicate=False)
    ids = {r["id"] for r in after}
    assert not ids & {before[0]["id"], before[1]["id"], before[2]["id"]} and len(after) == 10
    meta_rows = s.metadata_for([before[0]["id"], before[3]["id"]])
    assert meta_rows[0]["metadata"] == {} and meta_rows[1]["metadata"][S.KEY] == before[3][S.KEY]


def test_filters_run_sandboxed_with_a_time_limit(coll):
    """filters= goes through collection.sandbox: `id` is a column, a runaway clause is stopped by
    the time limit, a second statement is refused, and searching carries on with one worker."""
    from collection.sandbox import Limits
    from indices.search import QueryError, Searcher

    s = Searcher(
        coll, filter_limits=Limits(timeout_s=1.0, memory_limit="128MB", threads=1, grace_s=3.0)
    )
    q = np.load(S.CollectionLayout(coll).img_emb(0), mmap_mode="r")[11].astype(np.float32)
    rows = s.query(embedding=q, k=10, filters="id % 3 = 0", deduplicate=False)
    assert len(rows) == 10 and all(r["id"] % 3 == 0 for r in rows)
    pid = s._sandbox.pid
    with pytest.raises(QueryError, match="time limit"):
        s.query(
            embedding=q,
            filters="(SELECT sum(a.range * b.range) FROM range(1000000) a, range(1000000) b) > 0",
        )
    with pytest.raises(QueryError, match="one statement"):
        s.query(embedding=q, filters="TRUE; SELECT 1")
    rows = s.query(embedding=q, k=5, filters="part = 0", deduplicate=False)
    assert len(rows) == 5 and all(r["id"] < 1500 for r in rows)
    assert s._sandbox.pid is not None and (s._sandbox.pid == pid or s._sandbox.restarts >= 1)
    s.close()
