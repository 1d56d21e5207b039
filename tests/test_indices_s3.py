"""Indices of a collection on an object store (moto's S3 server on loopback): `indices.build`
writes into the bucket, the searcher, the server, the query command and the web UI search it
from local copies of its index and row files, and the exact re-rank reads only the candidates."""

from __future__ import annotations

import asyncio
import json
import os

import numpy as np
import pytest

from bench.synthetic import clustered_vectors, write_collection
from collection import schema as S
from collection.storage import read_json
from indices import build as B
from indices.local import cache_folder, has_index, index_files
from indices.search import Searcher

K = 5


@pytest.fixture(scope="module")
def pair(tmp_path_factory, s3_server, tiny_clip):
    """The same embedded collection (sieve-tiny, 3 parts) in a folder and in a bucket, each
    indexed by `indices.build` where it lies."""
    from pipelines.embed import embed
    from pipelines.generate import write_sample_dataset

    root = tmp_path_factory.mktemp("idx")
    write_sample_dataset(root / "shards", 90, size=32, shard_size=30, corrupt_fraction=0.05)
    local = str(root / "collection")
    embed(str(root / "shards"), local, workers=1, batch_size=32)
    bucket = s3_server.make_bucket("indices-s3")
    remote = f"{bucket}/collection"
    s3_server.filesystem().put(local, remote.removeprefix("s3://"), recursive=True)
    B.build(local)
    B.build(remote)
    return local, remote


def _names(s3_server, url: str) -> list[str]:
    fs = s3_server.filesystem()
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(url.removeprefix("s3://")))


def _copy(s3_server, src: str, dst: str) -> str:
    s3_server.filesystem().copy(
        src.removeprefix("s3://"), dst.removeprefix("s3://"), recursive=True
    )
    return dst


def test_build_writes_the_index_files_into_the_bucket(pair, s3_server):
    _, remote = pair
    layout = S.CollectionLayout(remote)
    names = _names(s3_server, layout.indices_dir)
    assert names == ["image.index", "image.json", "text.index", "text.json"]  # no temporaries
    doc = read_json(layout.index_json("image"))
    assert doc["index_bytes"] == s3_server.filesystem().size(layout.index("image")[5:])


def test_s3_build_searches_like_the_local_build(pair):
    local, remote = pair
    a, b = Searcher(local), Searcher(remote)
    assert a.count == b.count > 0 and b.modalities() == list(S.MODALITIES)
    queries = a.index("image")[2].gather(np.array([0, 17, a.count - 1]))
    for modality in S.MODALITIES:
        for q in queries:
            ra = a.query(embedding=q, k=K, modality=modality)
            rb = b.query(embedding=q, k=K, modality=modality)
            assert [r["id"] for r in ra] == [r["id"] for r in rb]
            assert [r[S.KEY] for r in ra] == [r[S.KEY] for r in rb]
            np.testing.assert_allclose(
                [r["similarity"] for r in ra], [r["similarity"] for r in rb], atol=1e-6
            )
    text = "a red circle"
    assert [r["id"] for r in a.query(text=text, k=K)] == [r["id"] for r in b.query(text=text, k=K)]
    # what is memory-mapped lies on local disk, in the collection's cache folder
    path, _ = index_files(remote, "image")
    assert path.startswith(cache_folder(remote)) and os.path.isfile(path)


def test_the_server_answers_on_an_s3_collection(pair):
    from aiohttp.test_utils import TestClient, TestServer

    from indices.app import App

    local, remote = pair
    want = [r["id"] for r in Searcher(local).query(text="a blue square", k=K)]
    app = App({"bucket": remote})

    async def go():
        async with TestClient(TestServer(app.make())) as c:
            listed = await (await c.get("/indices-list")).json()
            body = {"text": "a blue square", "indice_name": "bucket", "num_images": K}
            r = await c.post("/knn-service", data=json.dumps(body))
            return listed, r.status, await r.json()

    listed, status, rows = asyncio.run(go())
    assert listed == ["bucket"] and status == 200
    assert [r["id"] for r in rows] == want


def test_the_query_command_reads_and_writes_s3(pair, capsys):
    from indices.query import main

    local, remote = pair
    out = remote.rsplit("/", 1)[0] + "/results/clipsubset.json"
    main([remote, "--text", "a green triangle", "--k", str(K), "--out", out])
    summary = json.loads(capsys.readouterr().out)
    assert {k: summary[k] for k in ("out", "results")} == {"out": out, "results": K}
    got = read_json(out)
    want = Searcher(local).query(text="a green triangle", k=K)
    assert [r["id"] for r in got] == [r["id"] for r in want]
    assert [r[S.KEY] for r in got] == [r[S.KEY] for r in want]


def test_the_web_ui_finds_and_searches_an_s3_collection(pair):
    from webui import state

    _, remote = pair
    assert state.location(remote) == remote
    health = state.inspect(remote)
    assert health.exists and health.parts == 3 and health.indices == tuple(S.MODALITIES)
    assert not health.problems
    searcher = state.Loaded(health).searcher()
    assert len(searcher.query(text="a red circle", k=K)) == K
    missing = state.inspect(remote + "-nothing-here")
    assert not missing.exists and "does not exist" in missing.problems[0]


def test_a_changed_remote_index_is_fetched_again(pair, s3_server):
    _, remote = pair
    copy = _copy(s3_server, remote, remote + "-rebuilt")
    first, doc = index_files(copy, "image")
    again, _ = index_files(copy, "image")
    assert again == first and doc["index_key"] == "Flat"
    stamp = os.stat(first).st_mtime_ns
    B.build(copy, modality="image", index_key="HNSW16")
    fresh, doc = index_files(copy, "image")
    assert fresh != first and doc["index_key"] == "HNSW16"
    assert os.path.getsize(fresh) == doc["index_bytes"] and not os.path.exists(first)
    assert os.stat(fresh).st_mtime_ns >= stamp
    assert Searcher(copy).index("image")[1]["index_key"] == "HNSW16"


def test_an_interrupted_upload_never_looks_complete(pair, s3_server, monkeypatch):
    _, remote = pair
    copy = _copy(s3_server, remote, remote + "-cut")
    assert has_index(copy, "image")

    def cut(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(B.shutil, "copyfileobj", cut)  # the index upload dies half way
    with pytest.raises(KeyboardInterrupt):
        B.build_one(copy, "image")
    monkeypatch.undo()
    names = _names(s3_server, S.CollectionLayout(copy).indices_dir)
    assert "image.json" not in names and not [n for n in names if ".tmp" in n]
    assert not has_index(copy, "image") and Searcher(copy).modalities() == ["text"]

    monkeypatch.setattr(B, "write_json", cut)  # uploaded, but the json never written
    with pytest.raises(KeyboardInterrupt):
        B.build_one(copy, "image")
    monkeypatch.undo()
    assert "image.index" in _names(s3_server, S.CollectionLayout(copy).indices_dir)
    assert not has_index(copy, "image")


def test_the_re_rank_reads_only_the_candidates_rows(s3_bucket):
    """A PQ index of a remote collection is not re-ranked by default (each row a range read);
    with the setting, a query fetches its candidates' rows by range, never parts."""
    dim, per_part = 16, 1500
    parts = [clustered_vectors(per_part, dim, 20, seed=s) for s in range(3)]
    remote = write_collection(f"{s3_bucket}/synthetic", parts)
    doc = B.build_one(remote, "image", index_key="IVF16,PQ4x4", max_query_ms=1e6)
    assert doc["rerank"] and doc["rerank_source"].endswith("(range reads)")
    off = Searcher(remote, encoder=object())
    store = off.index("image")[2]
    before = store.bytes_read
    assert off.rerank_max == 0 and len(off.query(embedding=parts[1][7], k=K, deduplicate=False))
    assert store.bytes_read == before
    searcher = Searcher(remote, encoder=object(), rerank_max=1000)
    store = searcher.index("image")[2]
    row = dim * np.dtype(S.EMB_DTYPE).itemsize
    before = store.bytes_read
    rows = searcher.query(embedding=parts[1][7], k=K, deduplicate=False)
    fetched = store.bytes_read - before
    depth = max(4 * K, doc["params"]["rerank_k"], 50)
    assert rows[0]["id"] == per_part + 7 and len(rows) == K
    assert 0 < fetched <= depth * row < per_part * row  # never a whole part
    exact = store.gather(np.arange(store.count)) @ (parts[1][7] / np.linalg.norm(parts[1][7]))
    assert rows[0]["similarity"] == pytest.approx(float(exact.max()), abs=1e-3)


def test_bad_urls_get_one_line_errors(s3_bucket, capsys):
    with pytest.raises(SystemExit) as exit_:
        B.main(["s3://no-such-bucket-sieve/coll"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and err[-1].startswith("error: s3://no-such-bucket-sieve/coll")
    with pytest.raises(ValueError, match="indices/image.json"):
        index_files(f"{s3_bucket}/empty", "image")
