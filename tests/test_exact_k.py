"""Exactly k: large k and filtered searches through an IVF index probing a few lists return k
rows (all passing rows when fewer), the exact best ones, from the searcher, the server and a
subset spec's knn clause; small unfiltered queries keep the approximate fast path and say so.

The 1M-row case of issue 22 (IVF1024, nprobe 2, a filter keeping ~40%, k beyond what the probed
lists hold) planted at 4,000 rows: IVF32, nprobe 2 (about 250 vectors probed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.synthetic import clustered_vectors, write_collection
from collection import schema as S
from collection.embeddings import EmbeddingStore

DIM = 16
PART = 2000
N = 2 * PART
NPROBE = 2
K = 600  # more than two lists hold, more than pass the filter among them
FILTER = "clip_similarity > 0.6"


@pytest.fixture(scope="module")
def coll(tmp_path_factory):
    from indices.build import build_one, open_index

    root = str(tmp_path_factory.mktemp("exactk") / "coll")
    parts = [clustered_vectors(PART, DIM, 40, seed=i) for i in range(2)]
    sims = np.round(np.random.default_rng(7).uniform(0, 1, N), 3)
    write_collection(root, parts, columns={S.CLIP_SIMILARITY: sims.tolist()})
    build_one(root, S.MODALITY_IMAGE, index_key="IVF32,Flat", target_recall=0.0)
    path = S.CollectionLayout(root).index_json(S.MODALITY_IMAGE)
    doc = json.load(open(path))
    doc["params"] = {"nprobe": NPROBE}  # as the 1M case's tuned nprobe: a few lists of many
    json.dump(doc, open(path, "w"))
    index, _ = open_index(root, S.MODALITY_IMAGE)
    index.nprobe = NPROBE
    _, found = index.search(_query(_vectors(root))[None], K)
    assert (found >= 0).sum() < K / 2  # the planted case: the probed lists hold fewer than k
    assert 0.3 < len(_passing(root)) / N < 0.5
    return root


@pytest.fixture
def widening(monkeypatch):
    """Scans only where nearly every row would be read, as at 1M rows, where a probe of a few
    lists of 1,024 reads far less than the collection: here the probe is widened instead."""
    from curation import knn
    from indices import exact

    monkeypatch.setattr(exact, "EXACT_SHARE", 0.95)
    monkeypatch.setattr(knn, "EXACT_SHARE", 0.95)
    monkeypatch.setattr(knn, "EXACT_SCAN_MAX", 64)


def _vectors(root: str) -> np.ndarray:
    store = EmbeddingStore.open(root)
    return store.gather(np.arange(store.count))


def _passing(root: str) -> np.ndarray:
    sims = np.round(np.random.default_rng(7).uniform(0, 1, N), 3)
    return np.nonzero(sims > 0.6)[0]


def _brute(vectors: np.ndarray, q: np.ndarray, ids: np.ndarray, k: int):
    sims = vectors[ids] @ q
    order = np.lexsort((ids, -sims))[:k]
    return ids[order], sims[order]


def _query(vectors: np.ndarray) -> np.ndarray:
    q = vectors[11]
    return (q / np.linalg.norm(q)).astype(np.float32)


@pytest.mark.parametrize("filtered", [True, False])
def test_searcher_returns_exactly_k_exact_rows(coll, filtered):
    from indices.search import Searcher

    vectors = _vectors(coll)
    q = _query(vectors)
    s = Searcher(coll)
    rows = s.query(embedding=q, k=K, filters=FILTER if filtered else None, deduplicate=False)
    ids, sims = _brute(vectors, q, _passing(coll) if filtered else np.arange(N), K)
    assert len(rows) == K
    assert [r["id"] for r in rows] == ids.tolist()
    assert [r["similarity"] for r in rows] == pytest.approx(sims.tolist(), abs=1e-5)
    assert rows.exact


def test_fewer_passing_rows_than_k_returns_all_of_them(coll):
    from indices.search import Searcher

    vectors = _vectors(coll)
    q = _query(vectors)
    rows = Searcher(coll).query(
        embedding=q, k=3000, filters=FILTER, deduplicate=False
    )  # ~1,600 pass: every one of them, best first
    ids, _ = _brute(vectors, q, _passing(coll), 3000)
    assert [r["id"] for r in rows] == ids.tolist() and rows.exact


def test_filtered_large_k_widens_the_probe_to_k_rows(coll, widening):
    from indices.search import Searcher

    vectors = _vectors(coll)
    q = _query(vectors)
    rows = Searcher(coll).query(embedding=q, k=300, filters=FILTER, deduplicate=False)
    assert len(rows) == 300 and all(r[S.CLIP_SIMILARITY] > 0.6 for r in rows)
    assert not rows.exact  # more lists than the tuned two, but not all of them
    best, _ = _brute(vectors, q, _passing(coll), 300)
    assert len({r["id"] for r in rows} & set(best.tolist())) >= 0.8 * 300


def test_small_unfiltered_query_takes_the_approximate_fast_path(coll, monkeypatch):
    from indices.search import Searcher

    vectors = _vectors(coll)
    q = _query(vectors)
    s = Searcher(coll)
    monkeypatch.setattr(
        Searcher, "_scan", lambda *a: pytest.fail("a small k should not scan exactly")
    )
    monkeypatch.setattr(
        Searcher, "_widen", lambda *a: pytest.fail("a small k should not widen the probe")
    )
    rows = s.query(embedding=q, k=10, deduplicate=False)
    assert len(rows) == 10 and rows[0]["id"] == 11
    assert rows.exact is False


def test_server_answers_k_rows_and_says_whether_exact(coll):
    from aiohttp.test_utils import TestClient, TestServer

    from indices.app import App
    from indices.search import Searcher

    vectors = _vectors(coll)
    q = _query(vectors)
    app = App({}, searchers={"demo": Searcher(coll)})

    def body(k):
        return json.dumps(
            {
                "embedding_input": q.tolist(),
                "indice_name": "demo",
                "num_images": k,
                "deduplicate": False,
                "use_safety_model": False,
            }
        )

    async def go():
        async with TestClient(TestServer(app.make())) as client:
            out = []
            for k in (K, K, 5):  # the second is the answer cache's
                r = await client.post("/knn-service", data=body(k))
                out.append((r.status, r.headers.get("X-Sieve-Exact"), await r.json()))
            return out

    import asyncio

    (s1, exact1, big), (s2, exact2, again), (s3, exact3, small) = asyncio.run(go())
    ids, sims = _brute(vectors, q, np.arange(N), K)
    assert s1 == s2 == s3 == 200
    assert [r["id"] for r in big] == ids.tolist() and again == big
    assert [r["similarity"] for r in big] == pytest.approx(sims.tolist(), abs=1e-5)
    assert exact1 == exact2 == "true" and exact3 == "false" and len(small) == 5


def test_knn_clause_after_a_where_gives_exactly_k(coll, monkeypatch):
    from curation import knn
    from curation.resolve import resolve

    monkeypatch.setattr(knn, "EXACT_SCAN_MAX", 64)  # as at 1M rows: too many kept rows to scan
    vectors = _vectors(coll)
    q = _query(vectors)
    res = resolve(coll, {"where": FILTER, "knn": {"embedding": q.tolist(), "k": K}})
    ids, _ = _brute(vectors, q, _passing(coll), K)
    assert res.ids.tolist() == sorted(ids.tolist())
    only = resolve(coll, {"knn": {"embedding": q.tolist(), "k": K}})
    assert only.ids.tolist() == sorted(_brute(vectors, q, np.arange(N), K)[0].tolist())


def test_knn_clause_widens_the_probe_for_k_rows(coll, widening):
    from curation.resolve import resolve

    vectors = _vectors(coll)
    q = _query(vectors)
    res = resolve(coll, {"where": FILTER, "knn": {"embedding": q.tolist(), "k": 300}})
    best, _ = _brute(vectors, q, _passing(coll), 300)
    assert len(res.ids) == 300 and set(res.ids.tolist()) <= set(_passing(coll).tolist())
    assert len(set(res.ids.tolist()) & set(best.tolist())) >= 0.8 * 300


def test_search_page_shows_k_rows_and_says_when_approximate(coll):
    from tests.webui_app import results, run_app
    from webui.pages.search import KIND, LIKE

    like = {"id": 11, "key": "000000011", "caption": "caption 11"}
    at = run_app(coll, "pages/search.py", **{LIKE: like, KIND: "like"})
    assert not at.exception, at.exception
    captions = " | ".join(c.value for c in at.caption)
    assert len(results(at)) == 20 and "approximate" in captions
    at.toggle(key="search_dedup").set_value(False).run()
    at.text_input(key="search_filter").input(FILTER).run()
    at.number_input(key="search_k").set_value(500).run()
    captions = " | ".join(c.value for c in at.caption)
    assert len(results(at)) == 500 and "approximate" not in captions, captions


def test_near_duplicate_collapse_still_leaves_k_rows(coll, monkeypatch):
    from indices import search

    monkeypatch.setattr(search, "DEDUP_MAX_CANDIDATES", 100)  # a window k outgrows
    vectors = _vectors(coll)
    rows = search.Searcher(coll).query(embedding=_query(vectors), k=K, filters=FILTER)
    assert len(rows) == K and set(r["id"] for r in rows) <= set(_passing(coll).tolist())
    got = vectors[[r["id"] for r in rows]]
    sims = got @ got.T
    np.fill_diagonal(sims, 0)
    assert sims.max() < search.DEDUP_THRESHOLD


def test_a_hostile_filter_leaves_a_worker_for_another_users_search(coll):
    """Search filters run on a pool with a queue per client (thread): while one search's filter
    runs a query that would take minutes, another search's filter is answered first."""
    import threading

    from collection.sandbox import Limits, SqlError
    from indices.search import QueryError, Searcher

    q = _query(_vectors(coll))
    s = Searcher(coll, filter_limits=Limits(timeout_s=120, memory_limit="256MB"))
    hostile = (
        "id IN (SELECT a.range FROM range(100000000) a, range(100000000) b "
        "WHERE a.range = -b.range - 1)"
    )
    finished: list[str] = []

    def attacker() -> None:
        try:
            s.query(embedding=q, k=5, filters=hostile, deduplicate=False)
        except (QueryError, SqlError):
            pass  # its worker is stopped below
        finished.append("hostile")

    t = threading.Thread(target=attacker)
    t.start()
    try:
        while s._sandbox is None or not s._sandbox.running():
            threading.Event().wait(0.01)
        rows = s.query(embedding=q, k=5, filters=FILTER, deduplicate=False)
        finished.append("second user")
        assert len(rows) == 5
    finally:
        s.close()
        t.join(timeout=60)
    assert finished[0] == "second user"
