"""indices.app (served by `python -m indices.serve`): clip back's HTTP contract (the exact requests
ClipClient sends), errors."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import zlib

import numpy as np
import pytest

from bench.security_web import bomb_png
from bench.synthetic import clustered_vectors, write_collection
from collection import schema as S

DIM = 16


class HashEncoder:
    """Stand-in CLIP: a deterministic vector per text / per image mean colour."""

    dim = DIM

    def encode_texts(self, texts):
        out = np.stack(
            [np.random.default_rng(abs(hash(t)) % 2**32).standard_normal(DIM) for t in texts]
        )
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)

    def encode_images(self, images):
        return self.encode_texts([str(np.asarray(im).mean().round(1)) for im in images])


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from indices.app import App
    from indices.build import build
    from indices.search import Searcher

    root = str(tmp_path_factory.mktemp("srv"))
    write_collection(
        root, [clustered_vectors(400, DIM, 10, seed=0)], [clustered_vectors(400, DIM, 10, seed=1)]
    )
    build(root)
    return App({}, searchers={"demo": Searcher(root, encoder=HashEncoder())}, max_body=64 * 1024)


def clip_client_body(**kw):
    """Exactly the JSON ClipClient posts (all fields, nulls included, no content type)."""
    body = {
        "text": None,
        "image": None,
        "image_url": None,
        "embedding_input": None,
        "deduplicate": True,
        "use_safety_model": True,
        "use_violence_detector": True,
        "indice_name": "demo",
        "use_mclip": False,
        "aesthetic_score": 9,
        "aesthetic_weight": 0.5,
        "modality": "image",
        "num_images": 5,
        "num_result_ids": 5,
        "verbose": False,
    }
    body.update(kw)
    return json.dumps(body)


def run(app, fn):
    from aiohttp.test_utils import TestClient, TestServer

    async def go():
        async with TestClient(TestServer(app.make())) as client:
            return await fn(client)

    return asyncio.run(go())


def test_knn_service_matches_clip_back_shapes(app):
    async def fn(c):
        r = await c.post("/knn-service", data=clip_client_body(text="a red circle"))
        assert r.status == 200
        res = await r.json()
        assert isinstance(res, list) and len(res) == 5
        for row in res:
            assert isinstance(row["id"], int) and isinstance(row["similarity"], float)
            assert {"url", "caption"} <= set(row)
        emb = HashEncoder().encode_texts(["a red circle"])[0].tolist()
        r2 = await c.post(
            "/knn-service", data=clip_client_body(embedding_input=emb, modality="text")
        )
        assert r2.status == 200 and len(await r2.json()) == 5
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="JPEG")
        r3 = await c.post(
            "/knn-service", data=clip_client_body(image=base64.b64encode(buf.getvalue()).decode())
        )
        assert r3.status == 200 and len(await r3.json()) == 5
        ids = [row["id"] for row in res]
        m = await c.post("/metadata", data=json.dumps({"ids": ids, "indice_name": "demo"}))
        meta = await m.json()
        assert [x["id"] for x in meta] == ids and meta[0]["metadata"]["caption"] == res[0][
            "caption"
        ]
        assert await (await c.get("/indices-list")).json() == ["demo"]
        h = await (await c.get("/health")).json()
        assert h["status"] == "ok" and "image" in h["indices"]["demo"]
        metrics = await (await c.get("/metrics")).text()
        assert "sieve_knn_requests" in metrics
        # the same query again is served from the cache and is identical
        again = await (
            await c.post("/knn-service", data=clip_client_body(text="a red circle"))
        ).json()
        assert again == res
        return True

    assert run(app, fn)


def test_weighted_prompts_query_their_combined_embedding(app):
    """The server and `Searcher.query` read "a:1|b:-0.5" as subset specs do (models.prompts)."""
    from models.prompts import combine, parse_prompts

    prompts = parse_prompts("a red star:1|blurry:-0.5")
    q = combine(HashEncoder().encode_texts([p.text for p in prompts]), prompts)
    searcher = app.searchers["demo"]
    expected = [r["id"] for r in searcher.query(embedding=q, k=5, deduplicate=False)]
    assert [
        r["id"] for r in searcher.query(text="a red star:1|blurry:-0.5", k=5, deduplicate=False)
    ] == expected

    async def fn(c):
        r = await c.post(
            "/knn-service",
            data=clip_client_body(
                text="a red star:1|blurry:-0.5", deduplicate=False, use_safety_model=False
            ),
        )
        return [row["id"] for row in await r.json()]

    assert run(app, fn) == expected


@pytest.mark.parametrize(
    "body,status,word",
    [
        (clip_client_body(text="x", indice_name="nope"), 404, "unknown index"),
        (clip_client_body(), 400, "missing field"),
        (json.dumps({"text": "x"}), 400, "indice_name"),
        (clip_client_body(image="not base64!!"), 400, "base64"),
        (clip_client_body(image=base64.b64encode(b"garbage").decode()), 400, "image"),
        (clip_client_body(image_url="http://example.com/a.jpg"), 403, "image_url"),
        (clip_client_body(embedding_input=[1.0, 2.0]), 400, "dimension"),
        (clip_client_body(text="x", modality="audio"), 400, "modality"),
        ("{not json", 400, "JSON"),
        (clip_client_body(text="x" * 100_000), 413, "larger"),
        (clip_client_body(text="blurry:-1"), 400, "positive weight"),
    ],
)
def test_bad_requests_get_json_errors_and_server_keeps_serving(app, body, status, word):
    async def fn(c):
        r = await c.post("/knn-service", data=body)
        assert r.status == status
        assert word.lower() in (await r.json())["error"].lower()
        ok = await c.post("/knn-service", data=clip_client_body(text="still alive"))
        assert ok.status == 200
        bad = await c.post("/metadata", data=json.dumps({"ids": [10**9], "indice_name": "demo"}))
        assert bad.status == 400
        return True

    assert run(app, fn)


def _nested(levels: int) -> dict:
    value: dict = {}
    for _ in range(levels):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    "body,status,word",
    [
        ("[" * 100_000 + "]" * 100_000, 400, "nests"),
        (clip_client_body(text="x", extra=_nested(50)), 400, "nests"),
        (clip_client_body(image=base64.b64encode(bomb_png()).decode()), 413, "too large"),
    ],
    ids=["deep-list-body", "deep-object-field", "png-bomb"],
)
def test_hostile_requests_are_refused_with_a_reason_and_server_keeps_serving(
    app, body, status, word
):
    """Bodies that once gave HTTP 500: a JSON nesting past the parser's recursion limit, a deeply
    nested field inside a valid request, and an image whose header claims 10^10 pixels. Served
    with the default body limit (8 MiB), which the 200 kB list body is well within."""
    from indices.app import App

    roomy = App({}, searchers=app.searchers)
    assert len(body) < roomy.max_body

    async def fn(c):
        for _ in range(2):  # the same attack again gets the same answer
            r = await c.post("/knn-service", data=body)
            assert r.status == status
            assert word in (await r.json())["error"].lower()
            ok = await c.post("/knn-service", data=clip_client_body(text="still alive"))
            assert ok.status == 200 and len(await ok.json()) == 5
        m = await c.post("/metadata", data=body)
        assert 400 <= m.status < 500
        return True

    assert run(roomy, fn)


def test_the_png_bomb_header_really_claims_a_huge_image(monkeypatch):
    """The bomb is a well-formed PNG (valid CRCs): PIL refuses it as a bomb, and reads its
    100,000 x 100,000 header when the check is off, so the server's 413 is about its size."""
    from PIL import Image

    data = bomb_png()
    assert zlib.crc32(data[12:29]) == struct.unpack(">I", data[29:33])[0]  # IHDR's CRC
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with Image.open(io.BytesIO(data)) as img:
        assert img.size == (100_000, 100_000) and img.format == "PNG"


def test_concurrent_queries_are_batched(app):
    async def fn(c):
        rs = await asyncio.gather(
            *[c.post("/knn-service", data=clip_client_body(text=f"q{i}")) for i in range(24)]
        )
        assert all(r.status == 200 for r in rs)
        return max(app.batchers["demo"].batch_sizes)

    assert run(app, fn) > 1


@pytest.fixture(scope="module")
def tiny_app(tmp_path_factory, tiny_clip):
    """A real sieve-tiny collection (generated scenes, image embeddings from the bundled CLIP)
    served with the bundled CLIP answering text queries."""
    from indices.app import App
    from indices.build import build
    from indices.search import Searcher
    from models.scenes import iter_samples

    samples = list(iter_samples(420, size=64, seed=7))
    img = tiny_clip.encode_images([s.image for s in samples])
    txt = tiny_clip.encode_texts([s.caption for s in samples])
    root = str(tmp_path_factory.mktemp("tiny"))
    write_collection(
        root,
        [img[:210], img[210:]],
        [txt[:210], txt[210:]],
        columns={S.CAPTION: [s.caption for s in samples]},
    )
    build(root)
    app = App({}, searchers={"demo": Searcher(root, encoder=tiny_clip)})
    return app, [s.attrs for s in samples]


@pytest.mark.parametrize("color,shape", [("red", "circle"), ("blue", "square"), ("yellow", "star")])
def test_real_tiny_clip_text_queries_find_their_attributes(tiny_app, color, shape):
    app, attrs = tiny_app

    async def fn(c):
        r = await c.post(
            "/knn-service",
            data=clip_client_body(
                text=f"a {color} {shape}", num_images=10, num_result_ids=10, deduplicate=False
            ),
        )
        assert r.status == 200
        return await r.json()

    rows = run(app, fn)
    assert len(rows) == 10
    got = [attrs[row["id"]] for row in rows]
    base_color = np.mean([a["color"] == color for a in attrs])
    base_shape = np.mean([a["shape"] == shape for a in attrs])
    hit_color = np.mean([a["color"] == color for a in got])
    hit_shape = np.mean([a["shape"] == shape for a in got])
    # chance is ~1/10 for colour and ~1/7 for shape; the bundled CLIP must do far better
    assert hit_color >= max(0.4, 3 * base_color), (color, hit_color, base_color)
    assert hit_shape >= max(0.25, 2 * base_shape), (shape, hit_shape, base_shape)


def test_batched_trimmed_text_encoding_equals_the_plain_encoder(tiny_app, tiny_clip):
    """The server's batch path (text tower cut to the longest prompt) is exact in fp32."""
    app, _ = tiny_app
    texts = ["a red circle", "three small green stars on a noisy white background", "x"]
    fast = app.batchers["demo"].encode_texts(texts)
    np.testing.assert_allclose(fast, tiny_clip.encode_texts(texts), atol=1e-5)


def test_int8_server_text_tower_is_quantized_and_close(tiny_app, tiny_clip):
    """`--precision int8`: the server's own text copy is quantized;
    the collection's model is not."""
    from indices.app import Batcher
    from models.int8 import int8_supported

    if not int8_supported():
        pytest.skip("torch has no x86/fbgemm int8 engine")
    app, _ = tiny_app
    plain = app.batchers["demo"]
    int8 = Batcher(plain.searcher, app.executor, 8, "int8")
    texts = ["a red circle", "three small green stars on a noisy white background", "x"]
    got, want = int8.encode_texts(texts), tiny_clip.encode_texts(texts)
    assert (got * want).sum(1).min() > 0.999 and not np.allclose(got, want, atol=1e-5)
    assert "DynamicQuantizedLinear" in repr(int8._text.model.transformer)
    assert "DynamicQuantizedLinear" not in repr(tiny_clip.model)


def test_the_answer_cache_is_bounded_in_bytes(app):
    """Distinct queries with big answers: the cache keeps answer bytes under its bound (each
    entry counted with its key), drops the least recent first, and still answers from it."""
    from indices.app import App

    small = App({}, searchers=app.searchers, cache_bytes=64 * 1024)
    texts = [f"query {i}" for i in range(40)]

    async def fn(c):
        sizes = []
        for t in texts:
            r = await c.post(
                "/knn-service",
                data=clip_client_body(text=t, num_images=50, deduplicate=False),
            )
            sizes.append(len(await r.read()))
            assert small.cached_bytes <= small.cache_bytes
        again = await c.post(
            "/knn-service", data=clip_client_body(text=texts[-1], num_images=50, deduplicate=False)
        )
        assert again.status == 200
        return sizes

    sizes = run(small, fn)
    assert sum(sizes) > 4 * small.cache_bytes  # the answers would not all have fitted
    assert 0 < len(small.cache) < len(texts) and small.cache_hits._value.get() == 1
    assert small.cached_bytes == sum(len(k) + len(v) + 256 for k, v in small.cache.items())


@pytest.mark.parametrize(
    "fields,status,word",
    [
        ({"num_images": 10_000, "deduplicate": True}, 400, "deduplicate"),
        ({"num_images": 5, "num_result_ids": 5000, "deduplicate": True}, 400, "deduplicate"),
        ({"num_images": 10_001, "deduplicate": False}, 400, "10000"),
        ({"num_images": 4096, "deduplicate": True}, 200, ""),
        ({"num_images": 10_000, "deduplicate": False}, 200, ""),
    ],
)
def test_result_counts_are_bounded_with_and_without_dedup(app, fields, status, word):
    async def fn(c):
        r = await c.post("/knn-service", data=clip_client_body(text="x", **fields))
        body = await r.json()
        assert r.status == status, body
        if word:
            assert word in body["error"]
        else:
            assert len(body) <= 400  # the collection's size
        return True

    assert run(app, fn)


def test_metadata_ids_per_request_are_bounded(app):
    async def fn(c):
        r = await c.post("/metadata", data=json.dumps({"ids": [0] * 10_001, "indice_name": "demo"}))
        return r.status, (await r.json())["error"]

    status, error = run(app, fn)
    assert status == 400 and "10000" in error


def test_dedup_in_blocks_equals_the_whole_matrix():
    """The blockwise near-duplicate collapse drops exactly what the N x N rule drops, chains
    across blocks included."""
    from indices.search import duplicate_ids

    rng = np.random.default_rng(0)
    base = rng.standard_normal((60, 8)).astype(np.float32)
    vecs = np.concatenate([base, base + 0.01 * rng.standard_normal(base.shape)]).astype(np.float32)
    vecs = vecs[rng.permutation(len(vecs))]
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    sims = vecs @ vecs.T
    parent = list(range(len(vecs)))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(sims >= 0.94, 1))):
        a, b = find(i), find(j)
        parent[max(a, b)] = min(a, b)
    whole = {i for i in range(len(vecs)) if find(i) != i}
    assert len(whole) >= 50
    assert duplicate_ids(vecs, block=7) == duplicate_ids(vecs, block=1000) == whole
