"""curation.takedown: the list (atomic, reasons and dates kept, concurrent adds all kept, sha256
in any case), its command, and its enforcement by search and by a running server that applies
a change from the very next request, without a restart."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.synthetic import clustered_vectors, write_collection
from collection import schema as S, takedown as T
from collection.parts import read_metadata
from curation.takedown import takedown as takedown_command

REPO = Path(__file__).resolve().parent.parent
DIM = 16
SHA = "ab" * 32


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> str:
    from indices.build import build

    root = str(tmp_path_factory.mktemp("td") / "c")
    write_collection(
        root, [clustered_vectors(300, DIM, 6, seed=0)], [clustered_vectors(300, DIM, 6, seed=1)]
    )
    build(root)
    return root


@pytest.fixture()
def coll(built, tmp_path) -> str:
    root = str(tmp_path / "c")
    shutil.copytree(built, root)
    return root


def test_add_remove_list_keep_reasons_and_dates(coll):
    assert len(T.Takedown.load(coll)) == 0 and T.list_entries(coll).num_rows == 0
    assert T.add(coll, keys=["000000001", "000000002"], reason="dmca 1") == 2
    assert (
        T.add(coll, urls=["https://example.com/0/3.jpg"], sha256=[SHA.upper()], reason="request 2")
        == 2
    )
    assert T.add(coll, keys=["000000001"], reason="again") == 0  # listed once, first reason kept
    rows = T.list_entries(coll).to_pylist()
    assert [(r[S.KEY], r[S.URL], r[S.SHA256]) for r in rows] == [
        ("000000001", None, None),
        ("000000002", None, None),
        (None, "https://example.com/0/3.jpg", None),
        (None, None, SHA),
    ]
    assert [r[S.TAKEDOWN_REASON] for r in rows] == ["dmca 1", "dmca 1", "request 2", "request 2"]
    assert all(r[S.TAKEDOWN_ADDED].year >= 2024 for r in rows)
    assert T.remove(coll, keys=["000000002"], sha256=[SHA]) == 2
    assert T.list_entries(coll).column(S.KEY).to_pylist() == ["000000001", None]
    assert not [f for f in os.listdir(coll) if ".tmp" in f]


def test_blocked_mask_and_sql_predicate_agree(coll):
    meta = read_metadata(coll)
    keys, urls, shas = (meta.column(c).to_pylist() for c in (S.KEY, S.URL, S.SHA256))
    T.add(coll, keys=[keys[0], "not-there"], urls=[urls[5]], sha256=[shas[9]])
    td = T.Takedown.load(coll)
    want = np.zeros(meta.num_rows, dtype=bool)
    want[[0, 5, 9]] = True
    assert np.array_equal(td.blocked_mask(meta), want)
    assert np.array_equal(td.blocked_mask(meta.to_pandas()), want)
    import duckdb

    kept = duckdb.sql(f"SELECT key FROM meta WHERE {td.sql_predicate()}").fetchnumpy()[S.KEY]
    assert sorted(kept) == sorted(k for k, w in zip(keys, want) if not w)
    assert T.Takedown().sql_predicate() == "TRUE" and not T.Takedown().blocked_mask(meta).any()


def test_entry_files_text_csv_parquet(coll, tmp_path):
    text = tmp_path / "list.txt"
    text.write_text(f"# takedown requests\n000000007\nhttps://example.com/0/8.jpg\n\n{SHA}\n")
    csv = tmp_path / "list.csv"
    pd.DataFrame(
        {
            "key": ["000000010", None],
            "url": [None, "https://example.com/0/11.jpg"],
            "reason": ["from csv", None],
        }
    ).to_csv(csv, index=False)
    par = tmp_path / "list.parquet"
    pq.write_table(pa.table({"sha256": ["cd" * 32]}), par)
    out = takedown_command(coll, "add", file=str(text), reason="batch")
    assert out == {"added": 3, "entries": 3}
    assert takedown_command(coll, "add", file=str(csv), reason="fallback")["added"] == 2
    assert takedown_command(coll, "add", file=str(par))["added"] == 1
    rows = {
        (r[S.KEY] or r[S.URL] or r[S.SHA256]): r[S.TAKEDOWN_REASON]
        for r in T.list_entries(coll).to_pylist()
    }
    assert rows["000000007"] == "batch" and rows["000000010"] == "from csv"
    assert rows["https://example.com/0/11.jpg"] == "fallback" and rows["cd" * 32] is None
    assert takedown_command(coll, "remove", file=str(text)) == {"removed": 3, "entries": 3}


@pytest.mark.parametrize(
    "call,word",
    [
        (lambda c, tmp: T.add(c, sha256=["xyz"]), "64 hex"),
        (lambda c, tmp: T.add(c, keys=["  "]), "empty"),
        (lambda c, tmp: T.add(str(tmp / "nowhere"), keys=["k"]), "not a collection"),
        (lambda c, tmp: takedown_command(c, "add"), "at least one"),
        (lambda c, tmp: takedown_command(c, "add", file=str(tmp / "missing.txt")), "missing.txt"),
    ],
)
def test_bad_input_is_named(coll, tmp_path, call, word):
    with pytest.raises(T.TakedownError, match=word):
        call(coll, tmp_path)
    assert T.list_entries(coll).num_rows == 0


def test_a_csv_row_setting_two_columns_is_refused_naming_the_row(coll, tmp_path):
    csv = tmp_path / "bad.csv"
    csv.write_text("key,url\n000000001,\n000000002,https://x.invalid/a.jpg\n")
    with pytest.raises(T.TakedownError, match="row 3"):
        takedown_command(coll, "add", file=str(csv))


def test_an_unreadable_list_is_named(coll):
    Path(S.CollectionLayout(coll).takedown).write_bytes(b"not parquet")
    with pytest.raises(T.TakedownError, match="takedown.parquet"):
        T.Takedown.load(coll)


def test_command_add_list_remove(coll):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "curation.takedown", coll, *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )

    done = run(
        "add", "--key", "000000003", "--url", "https://example.com/0/4.jpg", "--reason", "dmca"
    )
    assert done.returncode == 0 and json.loads(done.stdout) == {"added": 2, "entries": 2}
    listed = json.loads(run("list").stdout)
    assert (
        listed["entries"] == 2
        and listed["rows"][0]["reason"] == "dmca"
        and listed["rows"][0]["added"]
    )
    assert json.loads(run("remove", "--key", "000000003").stdout) == {"removed": 1, "entries": 1}
    bad = run("add", "--sha256", "nope")
    assert (
        bad.returncode == 2 and "64 hex" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    )


def test_search_drops_listed_rows_from_the_next_query_without_reloading(coll):
    from indices.search import Searcher

    s = Searcher(coll)
    q = np.load(S.CollectionLayout(coll).img_emb(0), mmap_mode="r")[3].astype(np.float32)
    before = s.query(embedding=q, k=5, deduplicate=False)
    T.add(coll, keys=[before[0][S.KEY]], urls=[before[1][S.URL]])
    after = s.query(embedding=q, k=5, deduplicate=False)  # no wait: the next query sees it
    assert {before[0]["id"], before[1]["id"]}.isdisjoint(r["id"] for r in after) and len(after) == 5
    assert s.metadata_for([before[0]["id"]])[0]["metadata"] == {}
    T.remove(coll, keys=[before[0][S.KEY]])
    assert before[0]["id"] in [r["id"] for r in s.query(embedding=q, k=5, deduplicate=False)]
    T.add(coll, sha256=[_sha_of(coll, before[2]["id"]).upper()])
    assert before[2]["id"] not in [r["id"] for r in s.query(embedding=q, k=5, deduplicate=False)]


def _sha_of(coll: str, gid: int) -> str:
    """The sha256 the collection stores for global id `gid`."""
    from indices.rows import RowStore

    return RowStore.open(coll).take(np.array([gid]), [S.SHA256]).column(0)[0].as_py()


def test_each_rewrite_is_seen_even_at_the_same_size_within_one_clock_tick(coll):
    """Two lists of the same size written back to back: the change check tells them apart."""
    watch = T.TakedownWatch(coll)
    for key in ("000000001", "000000002", "000000003"):
        T.remove(coll, keys=["000000001", "000000002", "000000003"])
        T.add(coll, keys=[key])
        takedown, changed = watch.poll()
        assert changed and takedown.keys == {key}
    assert watch.poll() == (watch.takedown, False)


def test_concurrent_adds_all_land(coll):
    """Threads and processes adding different keys at once: every key is listed afterwards."""
    keys = [f"thread-{i}" for i in range(8)]
    start = threading.Barrier(len(keys))

    def add(key: str) -> None:
        start.wait()
        T.add(coll, keys=[key], reason="race")

    threads = [threading.Thread(target=add, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    code = (
        "import sys; from collection import takedown as T; T.add(sys.argv[1], keys=[sys.argv[2]])"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, coll, f"process-{i}"],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        for i in range(4)
    ]
    assert [p.wait(120) for p in procs] == [0] * 4
    listed = set(T.list_entries(coll).column(S.KEY).to_pylist())
    assert listed == set(keys) | {f"process-{i}" for i in range(4)}


def test_sha256_matches_in_any_case_everywhere(coll, tmp_path):
    """Listed upper-case, stored upper-case, or both: the mask, the SQL predicate, the scan
    filter, the searcher, remove and the duplicate check all agree."""
    import duckdb
    import pyarrow.dataset as pads

    from indices.search import Searcher

    lower, other = "ab" * 32, "cd" * 32
    rows = pa.table({S.KEY: ["a", "b", "c", "d"], S.SHA256: [lower, lower.upper(), other, None]})
    assert T.add(coll, sha256=[lower.upper()]) == 1
    assert T.add(coll, sha256=[lower]) == 0  # the same hash in another case is already listed
    td = T.Takedown.load(coll)
    want = [True, True, False, False]
    assert td.blocked_mask(rows).tolist() == want
    assert td.blocked_mask(rows.to_pandas()).tolist() == want
    kept = duckdb.sql(f"SELECT key FROM rows WHERE {td.sql_predicate()} ORDER BY key")
    assert [r[0] for r in kept.fetchall()] == ["c", "d"]
    scanned = pads.dataset(rows).to_table(filter=td.arrow_filter(rows.column_names))
    assert scanned.column(S.KEY).to_pylist() == ["c", "d"]
    searcher = Searcher(coll)
    gid = 4
    T.add(coll, sha256=[_sha_of(coll, gid).upper()])
    assert searcher.visible([gid, gid + 1]).tolist() == [False, True]
    assert T.remove(coll, sha256=[lower.upper()]) == 1 and len(T.Takedown.load(coll).sha256) == 1
    # a hand-written list holding upper-case hashes matches lower-case metadata too
    pq.write_table(pa.table({S.SHA256: [other.upper()]}), S.CollectionLayout(coll).takedown)
    assert T.Takedown.load(coll).blocked_mask(rows).tolist() == [False, False, True, False]


def test_running_server_picks_up_a_changed_list_and_drops_its_cached_answers(coll):
    from aiohttp.test_utils import TestClient, TestServer

    from indices.app import App
    from indices.search import Searcher

    app = App({}, searchers={"c": Searcher(coll)}, cache_bytes=2**20)
    q = np.load(S.CollectionLayout(coll).img_emb(0), mmap_mode="r")[7].astype(np.float32).tolist()
    body = json.dumps(
        {"embedding_input": q, "indice_name": "c", "num_images": 5, "deduplicate": False}
    )

    async def go():
        async with TestClient(TestServer(app.make())) as c:
            first = await (await c.post("/knn-service", data=body)).json()
            cached = await (await c.post("/knn-service", data=body)).json()
            assert cached == first and app.cache_hits._value.get() >= 1
            banned = first[0]
            T.add(coll, keys=[banned["key"]], reason="while serving")
            again = await (await c.post("/knn-service", data=body)).json()
            meta = await (
                await c.post(
                    "/metadata", data=json.dumps({"ids": [banned["id"]], "indice_name": "c"})
                )
            ).json()
            return banned, again, meta

    banned, again, meta = asyncio.run(go())
    assert banned["id"] not in [r["id"] for r in again] and len(again) == 5
    assert meta == [{"id": banned["id"], "metadata": {}}]


def test_an_unreadable_list_stops_serving_with_a_reason(coll):
    """Fail closed: a list the server cannot read means no answers (503), not answers without it."""
    from aiohttp.test_utils import TestClient, TestServer

    from indices.app import App
    from indices.search import Searcher

    app = App({}, searchers={"c": Searcher(coll)})
    q = np.load(S.CollectionLayout(coll).img_emb(0), mmap_mode="r")[7].astype(np.float32).tolist()
    body = json.dumps({"embedding_input": q, "indice_name": "c", "num_images": 3})

    async def go():
        async with TestClient(TestServer(app.make())) as c:
            assert (await c.post("/knn-service", data=body)).status == 200
            Path(S.CollectionLayout(coll).takedown).write_bytes(b"garbage")
            r = await c.post("/knn-service", data=body)
            return r.status, (await r.json())["error"]

    status, error = asyncio.run(go())
    assert status == 503 and "takedown" in error
