"""A tiny writer of the DESIGN.md collection layout, for tests and benchmarks.

The embed pipeline writes real collections; this writes the same files from given vectors
(float16, L2-normalised, one npy per part, metadata parquet with the schema columns, failed
rows without embeddings, `_done` markers last, collection.json).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from curation import schema as S


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def clustered_vectors(n: int, dim: int, n_clusters: int = 1000, spread: float = 0.6,
                      seed: int = 0, centers_seed: int = 1234) -> np.ndarray:
    """n L2-normalised vectors around n_clusters random centres (CLIP-like clumps)."""
    centres = normalise(np.random.default_rng(centers_seed).standard_normal((n_clusters, dim)))
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, n_clusters, n)] + rng.standard_normal((n, dim)).astype(np.float32) * (spread / np.sqrt(dim))
    return normalise(x)


def _clip_like_world(dim: int, n_topics: int, alpha: float, seed: int) -> dict[str, np.ndarray]:
    """The fixed generative world shared by every part: a rotated power-law spectrum, a
    two-level topic tree with Zipf popularity, and one offset per modality."""
    rng = np.random.default_rng(seed)
    scale = (np.arange(1, dim + 1) ** -alpha).astype(np.float32)
    scale /= np.linalg.norm(scale)
    rot = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
    n_super = max(1, int(np.sqrt(n_topics)))
    supers = rng.standard_normal((n_super, dim)).astype(np.float32) * scale
    topics = supers[rng.integers(0, n_super, n_topics)] + 0.7 * rng.standard_normal((n_topics, dim)).astype(np.float32) * scale
    weights = 1.0 / np.arange(1, n_topics + 1) ** 0.8
    offsets = rng.standard_normal((2, dim)).astype(np.float32)
    offsets *= 0.6 / np.linalg.norm(offsets, axis=1, keepdims=True)
    return {"scale": scale, "rot": rot, "topics": topics, "p": weights / weights.sum(), "offsets": offsets}


def clip_like_pairs(n: int, dim: int, seed: int = 0, n_topics: int = 4096, within: float = 0.6,
                    text_noise: float = 1.0, alpha: float = 0.6, world_seed: int = 1234) -> tuple[np.ndarray, np.ndarray]:
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


def write_collection(root: str, image_parts: Sequence[np.ndarray], text_parts: Sequence[np.ndarray] | None = None,
                     columns: dict[str, Sequence[Any]] | None = None, failed_per_part: int = 0,
                     clip_model: str = "sieve-tiny") -> str:
    """Write a collection; columns override metadata values (one list over all ok rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    layout = S.CollectionLayout(root)
    for d in (layout.metadata_dir, layout.img_emb_dir, layout.text_emb_dir, layout.done_dir):
        os.makedirs(d, exist_ok=True)
    gid = 0
    for n, img in enumerate(image_parts):
        img = normalise(img)
        k = len(img)
        np.save(layout.img_emb(n), img.astype(S.EMB_DTYPE))
        if text_parts is not None:
            np.save(layout.text_emb(n), normalise(text_parts[n]).astype(S.EMB_DTYPE))
        rows = k + failed_per_part
        ok = np.arange(rows) < k
        ids = gid + np.arange(k)
        data: dict[str, Any] = {
            S.KEY: [f"{n:03d}{r:06d}" for r in range(rows)],
            S.PART: [n] * rows, S.ROW: list(range(rows)),
            S.EMB_ROW: [int(r) if o else None for r, o in zip(range(rows), ok)],
            S.CAPTION: [f"caption {gid + r}" if o else None for r, o in zip(range(rows), ok)],
            S.URL: [f"https://example.com/{n}/{r}.jpg" for r in range(rows)],
            S.SOURCE_SHARD: [S.shard_name(n)] * rows, S.WIDTH: [64] * rows, S.HEIGHT: [64] * rows,
            S.SHA256: [f"{n:08x}{r:056x}" for r in range(rows)], S.PHASH: ["0" * 16] * rows,
            S.CLIP_SIMILARITY: [0.3] * rows, S.PUNSAFE: [0.01] * rows, S.PWATERMARK: [0.01] * rows,
            S.PTOXIC: [0.0] * rows, S.LANGUAGE: ["en"] * rows,
            S.STATUS: [S.STATUS_OK if o else S.STATUS_DECODE_ERROR for o in ok],
            S.ERROR: [None if o else "planted failure" for o in ok],
        }
        for col, values in (columns or {}).items():
            vals = list(values[gid:gid + k]) + [None] * failed_per_part
            data[col] = vals
        arrays = {c: pa.array(data[c], type=getattr(pa, S.METADATA_TYPES[c])()) if c in S.METADATA_TYPES
                  else pa.array(data[c]) for c in data}
        pq.write_table(pa.table(arrays), layout.metadata(n))
        with open(layout.done(n), "w") as fh:
            json.dump({"count": rows, "ok": k}, fh)
        gid += k
    dim = int(image_parts[0].shape[1])
    with open(layout.collection_json, "w") as fh:
        json.dump({"schema_version": S.SCHEMA_VERSION, "clip_model": clip_model, "emb_dim": dim,
                   "parts": len(image_parts), "ok": gid}, fh)
    return root


def write_takedown(root: str, keys: Sequence[str] = (), urls: Sequence[str] = (), sha256: Sequence[str] = ()) -> None:
    """takedown.parquet with key / url / sha256 columns (one entry per row, others null)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(keys) + len(urls) + len(sha256)
    col = lambda vals, off: [None] * off + list(vals) + [None] * (n - off - len(vals))  # noqa: E731
    pq.write_table(pa.table({S.KEY: pa.array(col(keys, 0), pa.string()),
                             S.URL: pa.array(col(urls, len(keys)), pa.string()),
                             S.SHA256: pa.array(col(sha256, len(keys) + len(urls)), pa.string())}),
                   S.CollectionLayout(root).takedown)
