"""Generated collections in the DESIGN.md layout, for tests and benchmarks.

The embed pipeline writes real collections from images; this writes the same files from
given vectors through the same writer (`pipelines.embed_writer.write_part`: float16 embeddings,
metadata parquet with the schema columns, failed rows without embeddings, the `_done` marker
last; `collection.storage.write_collection_json` for collection.json).
"""

from __future__ import annotations

import io
import os
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from collection import schema as S
from collection.shards import list_shards, read_shard
from collection.storage import write_bytes, write_collection_json, write_json
from pipelines.decode import decode_sample
from pipelines.embed_writer import metadata_table, npy_bytes, write_part


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def clustered_vectors(
    n: int,
    dim: int,
    n_clusters: int = 1000,
    spread: float = 0.6,
    seed: int = 0,
    centers_seed: int = 1234,
    fast: bool = False,
) -> np.ndarray:
    """n L2-normalised vectors around n_clusters random centres (CLIP-like clumps). `fast` draws
    the noise in float32 (twice as fast; other values for the same seed, the same law)."""
    centres = normalise(np.random.default_rng(centers_seed).standard_normal((n_clusters, dim)))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_clusters, n)
    if fast:
        noise = rng.standard_normal((n, dim), dtype=np.float32)
    else:
        noise = rng.standard_normal((n, dim)).astype(np.float32)
    noise *= spread / np.sqrt(dim)
    noise += centres[labels]
    return normalise(noise)


def _clip_like_world(dim: int, n_topics: int, alpha: float, seed: int) -> dict[str, np.ndarray]:
    """The fixed generative world shared by every part: a rotated power-law spectrum, a
    two-level topic tree with Zipf popularity, and one offset per modality."""
    rng = np.random.default_rng(seed)
    scale = (np.arange(1, dim + 1) ** -alpha).astype(np.float32)
    scale /= np.linalg.norm(scale)
    rot = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
    n_super = max(1, int(np.sqrt(n_topics)))
    supers = rng.standard_normal((n_super, dim)).astype(np.float32) * scale
    topics = (
        supers[rng.integers(0, n_super, n_topics)]
        + 0.7 * rng.standard_normal((n_topics, dim)).astype(np.float32) * scale
    )
    weights = 1.0 / np.arange(1, n_topics + 1) ** 0.8
    offsets = rng.standard_normal((2, dim)).astype(np.float32)
    offsets *= 0.6 / np.linalg.norm(offsets, axis=1, keepdims=True)
    return {
        "scale": scale,
        "rot": rot,
        "topics": topics,
        "p": weights / weights.sum(),
        "offsets": offsets,
    }


def clip_like_pairs(
    n: int,
    dim: int,
    seed: int = 0,
    n_topics: int = 4096,
    within: float = 0.6,
    text_noise: float = 1.0,
    alpha: float = 0.6,
    world_seed: int = 1234,
) -> tuple[np.ndarray, np.ndarray]:
    """n (image, text) pairs of L2-normalised vectors shaped like CLIP embeddings: anisotropic
    (power-law spectrum of exponent alpha in a random basis), many overlapping topics of Zipf
    popularity, a modality gap (each modality its own offset), and captions that are noisy
    views of their image. Harder than `clustered_vectors`: neighbours cross topic borders and
    the top-10 similarities are close, so IVF probing and PQ error both matter."""
    w = _clip_like_world(dim, n_topics, alpha, world_seed)
    rng = np.random.default_rng(seed)
    z = w["topics"][rng.choice(n_topics, size=n, p=w["p"])]
    z += within * rng.standard_normal((n, dim)).astype(np.float32) * w["scale"]
    img = (z + w["offsets"][0]) @ w["rot"]
    z += text_noise * rng.standard_normal((n, dim)).astype(np.float32) * w["scale"]
    txt = (z + w["offsets"][1]) @ w["rot"]
    return normalise(img), normalise(txt)


def write_collection(
    root: str,
    image_parts: Sequence[np.ndarray],
    text_parts: Sequence[np.ndarray] | None = None,
    columns: dict[str, Sequence[Any]] | None = None,
    failed_per_part: int = 0,
    clip_model: str = "sieve-tiny",
) -> str:
    """Write a collection; columns override metadata values (one list over all ok rows).

    Without text_parts the parts have image embeddings only (as clip-retrieval folders may).
    """
    gid = 0
    for n, img in enumerate(image_parts):
        k = len(img)
        rows = [_row(n, r, gid + r if r < k else None) for r in range(k + failed_per_part)]
        for col, values in (columns or {}).items():
            for r, value in enumerate(list(values[gid : gid + k]) + [None] * failed_per_part):
                rows[r][col] = value
        img16 = normalise(img).astype(S.EMB_DTYPE)
        done = {"count": len(rows), "ok": k}
        if text_parts is not None:
            write_part(root, n, rows, img16, normalise(text_parts[n]).astype(S.EMB_DTYPE), done)
        else:  # write_part commits both modalities: the same files in the same order, less text_emb
            layout = S.CollectionLayout(root)
            write_bytes(layout.img_emb(n), npy_bytes(img16))
            buf = io.BytesIO()
            pq.write_table(metadata_table(rows), buf)
            write_bytes(layout.metadata(n), buf.getvalue())
            write_json(layout.done(n), done)
        gid += k
    write_collection_json(
        root,
        {
            "clip_model": clip_model,
            "emb_dim": int(image_parts[0].shape[1]),
            "parts": len(image_parts),
            "ok": gid,
        },
    )
    return root


def _row(n: int, r: int, ok_id: int | None) -> dict[str, Any]:
    """Row r of part n: an embedded sample
    (`ok_id`, its id over the collection) or a planted failure."""
    ok = ok_id is not None
    return {
        S.KEY: f"{n:03d}{r:06d}",
        S.PART: n,
        S.ROW: r,
        S.EMB_ROW: r if ok else None,
        S.CAPTION: f"caption {ok_id}" if ok else None,
        S.URL: f"https://example.com/{n}/{r}.jpg",
        S.SOURCE_SHARD: S.shard_name(n),
        S.WIDTH: 64,
        S.HEIGHT: 64,
        S.SHA256: f"{n:08x}{r:056x}",
        S.PHASH: "0" * 16,
        S.CLIP_SIMILARITY: 0.3,
        S.PUNSAFE: 0.01,
        S.PWATERMARK: 0.01,
        S.PTOXIC: 0.0,
        S.LANGUAGE: "en",
        S.STATUS: S.STATUS_OK if ok else S.STATUS_DECODE_ERROR,
        S.ERROR: None if ok else "planted failure",
    }


def write_takedown(
    root: str, keys: Sequence[str] = (), urls: Sequence[str] = (), sha256: Sequence[str] = ()
) -> None:
    """takedown.parquet with key / url / sha256 columns (one entry per row, others null)."""
    n = len(keys) + len(urls) + len(sha256)
    col = lambda vals, off: [None] * off + list(vals) + [None] * (n - off - len(vals))  # noqa: E731
    pq.write_table(
        pa.table(
            {
                S.KEY: pa.array(col(keys, 0), pa.string()),
                S.URL: pa.array(col(urls, len(keys)), pa.string()),
                S.SHA256: pa.array(col(sha256, len(keys) + len(urls)), pa.string()),
            }
        ),
        S.CollectionLayout(root).takedown,
    )


# ---- LAION-sized collections with vectors (UI and search benchmarks) -----------------------
def _phash_from(table: pa.Table, img: np.ndarray, seed: int) -> pa.Table:
    """`table` with the embedded rows' phash made from their image vectors (`simhash_phash`)."""
    ok = pc.is_valid(table[S.EMB_ROW]).to_numpy(zero_copy_only=False)
    phash = np.asarray(table[S.PHASH].to_numpy(zero_copy_only=False), dtype="<U16")
    rows = pc.fill_null(table[S.EMB_ROW], 0).to_numpy(zero_copy_only=False)
    phash[ok] = simhash_phash(img, seed)[rows[ok]]
    i = table.schema.get_field_index(S.PHASH)
    return table.set_column(i, table.schema.field(i), pa.array(phash, table.schema.field(i).type))


def write_vector_collection(
    root: str,
    n: int,
    parts: int,
    dim: int,
    seed: int = 0,
    n_clusters: int = 1000,
    clip_model: str = "sieve-tiny",
    sources: pa.Table | None = None,
) -> str:
    """n LAION-shaped rows in `parts` parts (`metadata_part`'s columns) with clustered image and
    text vectors of `dim`, written straight from Arrow and numpy (a million rows in a minute,
    where `write_collection`'s per-row dicts would take many). `sources`: columns such as
    source_shard (and the image's byte range) cycled over the rows, so a reader of source images
    finds real ones. Parts already written are kept, so a work folder is reused across runs.
    Each embedded row's phash is its image vector's `simhash_phash` unless `sources` has one.
    `bench.synthetic_scale` writes the parts of a larger one in several processes."""
    for part in range(parts):
        write_vector_part(root, part, n, parts, dim, seed, n_clusters, sources)
    write_collection_json(
        root, {"clip_model": clip_model, "emb_dim": dim, "parts": parts, "count": n}
    )
    return root


def write_vector_part(
    root: str,
    part: int,
    n: int,
    parts: int,
    dim: int,
    seed: int = 0,
    n_clusters: int = 1000,
    sources: pa.Table | None = None,
    fast: bool = False,
) -> bool:
    """Part `part` of `write_vector_collection`'s collection; False when it was already there.
    `fast`: `clustered_vectors`'s float32 noise (the parts of `bench.synthetic_scale`)."""
    layout = S.CollectionLayout(root)
    per = -(-n // parts)
    rows = min(per, n - part * per)
    if os.path.exists(layout.done(part)):
        return False
    table = metadata_part(part, rows, seed)
    if sources is not None:
        idx = pa.array((np.arange(rows) + part * per) % sources.num_rows)
        for name in sources.column_names:
            col = sources.column(name).take(idx)
            i = table.schema.get_field_index(name)
            table = (
                table.set_column(i, name, col.cast(table.schema.field(i).type))
                if i >= 0
                else table.append_column(name, col)
            )
    ok = int(pc.sum(table[S.EMB_ROW].is_valid()).as_py())
    img = clustered_vectors(ok, dim, n_clusters, seed=seed * 100_003 + 2 * part, fast=fast)
    if sources is None or S.PHASH not in sources.column_names:
        table = _phash_from(table, img, seed)
    txt = clustered_vectors(
        ok, dim, n_clusters, spread=0.8, seed=seed * 100_003 + 2 * part + 1, fast=fast
    )
    write_bytes(layout.img_emb(part), npy_bytes(img.astype(S.EMB_DTYPE)))
    write_bytes(layout.text_emb(part), npy_bytes(txt.astype(S.EMB_DTYPE)))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes(layout.metadata(part), buf.getvalue())
    write_json(layout.done(part), {"count": rows, "ok": ok})  # last: the part is complete
    return True


# ---- metadata-only collections (SQL benchmarks) -------------------------------------------
_WORDS = (
    "a",
    "photo",
    "of",
    "red",
    "blue",
    "green",
    "small",
    "large",
    "two",
    "three",
    "circle",
    "star",
    "square",
    "on",
    "white",
    "background",
    "the",
    "in",
    "corner",
    "stock",
    "image",
    "vintage",
)
_LANGUAGES = ("en",) * 5 + ("de", "fr", "es", "zh", "ja", "und", "und")


_HEX_PAIRS = np.array([f"{b:02x}" for b in range(256)])


def hex64(bits: np.ndarray) -> np.ndarray:
    """16-hex-digit strings of (n, 8) uint8 rows (the collection's `phash` form), vectorised."""
    pairs = _HEX_PAIRS[np.asarray(bits, dtype=np.uint8).reshape(-1, 8)]  # (n, 8) of "<U2"
    return np.ascontiguousarray(pairs).view("<U16").ravel()


def simhash_phash(vectors: np.ndarray, seed: int = 0) -> np.ndarray:
    """A 64-bit perceptual-hash stand-in for each vector: the signs of 64 fixed random
    projections (SimHash), so near vectors get phashes a few bits apart, as copies do."""
    planes = np.random.default_rng([seed, 64]).standard_normal((vectors.shape[1], 64))
    return hex64(np.packbits(np.asarray(vectors, np.float32) @ planes > 0, axis=1))


def metadata_part(part: int, rows: int, seed: int = 0, failed: float = 0.02) -> pa.Table:
    """One LAION-shaped metadata part as an Arrow table: every schema column (schema types), varied
    captions, urls, hashes, sizes, scores and languages, about `failed` of the rows failed; built
    with numpy and pyarrow compute so ten million rows take seconds, not minutes."""
    rng = np.random.default_rng([seed, part])
    ok = rng.random(rows) >= failed
    emb_row = np.where(ok, np.cumsum(ok) - 1, 0).astype(np.int32)
    words = np.array(_WORDS)
    caption = pa.array(words[rng.integers(0, len(words), rows)])
    for _ in range(int(rng.integers(3, 9))):  # 3-11 words, varying per part
        caption = pc.binary_join_element_wise(
            caption, pa.array(words[rng.integers(0, len(words), rows)]), " "
        )
    keys = pa.array(np.char.add(f"{part:06d}", np.char.zfill(np.arange(rows).astype(str), 6)))
    sha = pa.array(
        np.char.add(np.char.zfill(rng.integers(0, 2**62, rows).astype(str), 32), "f" * 32)
    )
    f32 = lambda x: pa.array(x.astype(np.float32))  # noqa: E731
    t = {
        S.KEY: keys,
        S.PART: pa.array(np.full(rows, part, np.int32)),
        S.ROW: pa.array(np.arange(rows, dtype=np.int32)),
        S.EMB_ROW: pa.array(emb_row, mask=~ok),
        S.CAPTION: caption,
        S.URL: pc.binary_join_element_wise("https://img.example.com/", keys, ".jpg", ""),
        S.SOURCE_SHARD: pa.array(np.full(rows, f"s3://bucket/laion/{part:05d}.tar")),
        S.WIDTH: pa.array(rng.integers(32, 2048, rows).astype(np.int32)),
        S.HEIGHT: pa.array(rng.integers(32, 2048, rows).astype(np.int32)),
        S.SHA256: sha,
        S.PHASH: pa.array(hex64(rng.integers(0, 256, (rows, 8), dtype=np.uint8))),
        S.CLIP_SIMILARITY: f32(rng.normal(0.3, 0.06, rows)),
        S.PUNSAFE: f32(rng.beta(0.5, 8, rows)),
        S.PWATERMARK: f32(rng.beta(0.8, 3, rows)),
        S.PTOXIC: f32(rng.beta(0.3, 12, rows)),
        S.LANGUAGE: pa.array(np.array(_LANGUAGES)[rng.integers(0, len(_LANGUAGES), rows)]),
        S.STATUS: pa.array(np.where(ok, S.STATUS_OK, S.STATUS_DECODE_ERROR)),
        S.ERROR: pa.array(np.where(ok, None, "planted failure"), pa.string()),
        S.LANGUAGE_SCORE: f32(rng.uniform(0.3, 1.0, rows)),
        S.CAPTION_LENGTH: pc.utf8_length(caption),
        S.SOURCE_OFFSET: pa.array(512 + 4096 * np.arange(rows, dtype=np.int64)),
        S.SOURCE_SIZE: pa.array(rng.integers(1024, 3584, rows).astype(np.int64)),
    }
    arrays = [t[c].cast(getattr(pa, S.METADATA_TYPES[c])()) for c in S.METADATA_COLUMNS]
    # a source column, as img2dataset's
    arrays.append(pa.array(rng.integers(0, 5, rows).astype(np.int64)))
    return pa.Table.from_arrays(arrays, names=[*S.METADATA_COLUMNS, "src_aesthetic"])


def write_metadata_parts(
    root: str,
    n: int,
    parts: int,
    seed: int = 0,
    clip_model: str = "open_clip:ViT-B-32/laion2b_s34b_b79k",
) -> str:
    """A metadata-only collection (no embeddings) of n rows in `parts` parts, scored as if by
    `clip_model` (similarities around LAION's ViT-B/32 threshold); parts already written are
    kept, so a benchmark's work folder is reused across runs."""
    layout = S.CollectionLayout(root)
    per = -(-n // parts)
    for part in range(parts):
        if os.path.exists(layout.done(part)):
            continue
        rows = min(per, n - part * per)
        table = metadata_part(part, rows, seed)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        write_bytes(layout.metadata(part), buf.getvalue())
        write_json(
            layout.done(part),
            {"count": rows, "ok": int(pc.sum(table[S.EMB_ROW].is_valid()).as_py())},
        )
    write_collection_json(root, {"clip_model": clip_model, "parts": parts, "count": n})


# ---- collections over real shards (export benchmarks and tests) ----------------------------
def collection_from_shards(
    shards: str, root: str, dim: int = 64, seed: int = 0, clip_model: str = "sieve-tiny"
) -> str:
    """A collection over real img2dataset shards without running CLIP: each sample's row is what
    the embed job records (`pipelines.decode.decode_sample`: status, sizes, hashes, the image's
    byte offset in its tar), its embeddings CLIP-shaped random pairs. For tests and benchmarks
    of what reads the source shards back (export)."""
    ok = count = 0
    shard_list = list_shards(shards)
    for shard in shard_list:
        rows, n_ok = [], 0
        for raw in read_shard(shard):
            row, pixels = decode_sample(raw, shard.url)
            row[S.PART], row[S.ROW] = shard.index, len(rows)
            if pixels is not None:
                row[S.EMB_ROW], row[S.CLIP_SIMILARITY] = n_ok, 0.3
                n_ok += 1
            rows.append(row)
        img, txt = clip_like_pairs(n_ok, dim, seed=seed * 100_003 + shard.index, n_topics=64)
        write_part(
            root,
            shard.index,
            rows,
            img.astype(S.EMB_DTYPE),
            txt.astype(S.EMB_DTYPE),
            {"count": len(rows), "ok": n_ok},
        )
        ok, count = ok + n_ok, count + len(rows)
    write_collection_json(
        root,
        {
            "clip_model": clip_model,
            "emb_dim": dim,
            "source": shards,
            "parts": len(shard_list),
            "count": count,
            "ok": ok,
        },
    )
    return root
