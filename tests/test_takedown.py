"""curation.takedown: the list (atomic, reasons and dates kept), its command, and its
enforcement by search and by a running server that picks up changes without a restart."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
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


def test_search_drops_listed_rows_after_a_change_without_reloading(coll):
    from indices.search import Searcher

    s = Searcher(coll)
    q = np.load(S.CollectionLayout(coll).img_emb(0), mmap_mode="r")[3].astype(np.float32)
    before = s.query(embedding=q, k=5, deduplicate=False)
    T.add(coll, keys=[before[0][S.KEY]], urls=[before[1][S.URL]])
    time.sleep(1.1)  # the searcher looks at the file at most once a second
    after = s.query(embedding=q, k=5, deduplicate=False)
    assert {before[0]["id"], before[1]["id"]}.isdisjoint(r["id"] for r in after) and len(after) == 5
    assert s.metadata_for([before[0]["id"]])[0]["metadata"] == {}
    T.remove(coll, keys=[before[0][S.KEY]])
    time.sleep(1.1)
    assert before[0]["id"] in [r["id"] for r in s.query(embedding=q, k=5, deduplicate=False)]


def test_running_server_picks_up_a_changed_list_and_drops_its_cached_answers(coll):
    from aiohttp.test_utils import TestClient, TestServer

    from indices.app import App
    from indices.search import Searcher

    app = App({}, searchers={"c": Searcher(coll)}, cache_size=100)
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
            await asyncio.sleep(1.2)
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
            await asyncio.sleep(1.2)
            r = await c.post("/knn-service", data=body)
            return r.status, (await r.json())["error"]

    status, error = asyncio.run(go())
    assert status == 503 and "takedown" in error
