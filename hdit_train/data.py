"""Training input: webdataset shards, plain img2dataset ones or Sieve exports with embeddings.

A sample is the group of adjacent tar members sharing a key ({key}.jpg/.txt/.json and, in
exports, {key}.img_emb.npy/.txt_emb.npy). Undecodable samples are logged and counted, never
crash the run. The stream is deterministic for a (seed, rank, world) so `--resume` can skip
exactly the samples already consumed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import random
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from collection import schema as S
from collection.shards import (
    WEBDATASET,
    RawSample,
    Shard,
    ShardOpenError,
    fingerprint,
    list_shards,
    read_tar,
)
from collection.storage import read_json, url_to_fs

log = logging.getLogger(__name__)

IMG_EMB, TXT_EMB = S.EXPORT_IMG_EMB_EXT, S.EXPORT_TXT_EMB_EXT


def training_shards(data: str | Path) -> list[Shard]:
    """The webdataset tars of a folder, a single tar, a glob or a brace pattern, sorted."""
    try:
        shards = [s for s in list_shards(str(data)) if s.format == WEBDATASET]
    except (FileNotFoundError, ValueError):
        shards = []
    if not shards:
        raise FileNotFoundError(f"no webdataset .tar shards found at {data}")
    return shards


def read_manifest(data: str | Path) -> dict[str, Any] | None:
    """The export's manifest.json next to the shards (keys: `collection.schema.MANIFEST_*`), or None
    for plain img2dataset shards."""
    fs, path = url_to_fs(data)
    try:
        is_dir = fs.isdir(path)
    except OSError as err:
        raise FileNotFoundError(f"{data}: cannot list the training data ({err})") from err
    folder = str(data).rstrip("/") if is_dir else posixpath.dirname(training_shards(data)[0].url)
    path = posixpath.join(folder, S.EXPORT_MANIFEST)
    try:
        manifest = read_json(path)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if manifest is None:
        return None
    missing = [
        k for k in S.MANIFEST_REQUIRED if not isinstance(manifest, dict) or k not in manifest
    ]
    if missing:
        raise ValueError(f"{path}: not a curation.export manifest (no {missing[0]!r})")
    if manifest[S.MANIFEST_FORMAT] != S.EXPORT_WEBDATASET:
        raise ValueError(
            f"{path}: a {manifest[S.MANIFEST_FORMAT]} export; training reads webdataset exports"
        )
    return manifest


def data_hash(data: str | Path) -> str:
    """A hash of the shards' names and sizes: what a resumed run checks it still trains on."""
    h = hashlib.sha256()
    for shard in training_shards(data):
        h.update(f"{shard.name}:{fingerprint(shard.url).get('size')}\n".encode())
    return h.hexdigest()[:16]


def manifest_clip_spec(manifest: dict[str, Any] | None) -> str | None:
    """The CLIP model an export's embeddings came from (None for plain shards)."""
    return manifest[S.MANIFEST_CLIP_MODEL] if manifest else None


def manifest_spec_hash(manifest: dict[str, Any] | None) -> str | None:
    """The export's spec hash: names the exact subset query a run trained on (None for plain
    shards)."""
    return manifest[S.MANIFEST_SPEC_HASH] if manifest else None


def shard_samples(shard: Shard) -> Iterator[RawSample]:
    """The samples of one training shard; a shard that cannot be opened is logged and skipped."""
    try:
        yield from read_tar(shard.url)
    except ShardOpenError as err:
        log.warning("%s: %s; skipping this shard", shard.url, err)


def _vector(npy: bytes) -> np.ndarray:
    """A stored embedding member (`.npy` bytes) as a float32 vector."""
    return np.load(io.BytesIO(npy)).astype(np.float32).reshape(-1)


def load_image(raw: bytes, size: int):
    """Decode, resize the short side to size and centre-crop; float tensor in [-1, 1], CHW, and
    the decoded image at its stored size (what CLIP embeds, as the embed pipeline does)."""
    original = Image.open(io.BytesIO(raw)).convert("RGB")
    w, h = original.size
    scale = size / min(w, h)
    img = original.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
    return arr / 127.5 - 1, original


def modality_gap(data: str | Path, encoder, n: int = 1024) -> np.ndarray:
    """mean(image embedding) - mean(text embedding) over the first n samples of the shards.

    CLIP's image and text embeddings sit in separate cones (the "modality gap"), so a model
    conditioned on image embeddings sees text embeddings as out of distribution. Adding this
    vector to a prompt's embedding moves it to where the image embeddings live. Stored
    embeddings (export shards) are used when present; otherwise `encoder` computes them.
    """
    imgs, txts, pixels, captions = [], [], [], []
    for shard in training_shards(data):
        for raw in shard_samples(shard):
            if raw.image is None or raw.caption is None or raw.error:
                continue
            if IMG_EMB in raw.other and TXT_EMB in raw.other:
                imgs.append(_vector(raw.other[IMG_EMB]))
                txts.append(_vector(raw.other[TXT_EMB]))
            else:
                try:
                    pixels.append(Image.open(io.BytesIO(raw.image)).convert("RGB"))
                except (OSError, SyntaxError, ValueError):
                    continue
                captions.append(raw.caption)
            if len(imgs) + len(pixels) >= n:
                break
        if len(imgs) + len(pixels) >= n:
            break
    if pixels:
        imgs.extend(encoder.encode_images(pixels))
        txts.extend(encoder.encode_texts(captions))
    if not imgs:
        raise ValueError(
            f"{data}: no samples with both an image and a caption to measure the modality gap"
        )
    return np.mean(imgs, axis=0) - np.mean(txts, axis=0)


class ShardStream:
    """Endless, deterministic, shuffled stream of decoded samples for one rank.

    cond: "none", "class" (class_field of the json, mapped by `classes` if it is a string) or
    "clip" (stored img_emb.npy, else the CLIP-preprocessed pixels for the trainer to embed).
    """

    def __init__(
        self,
        data: str | Path,
        size: int,
        cond: str = "none",
        class_field: str | None = None,
        classes: list[str] | None = None,
        clip_preprocess=None,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        rank: int = 0,
        world: int = 1,
    ):
        self.shards = training_shards(data)
        self.size, self.cond, self.class_field, self.classes = size, cond, class_field, classes
        self.clip_preprocess = clip_preprocess
        self.seed, self.shuffle_buffer, self.rank, self.world = seed, shuffle_buffer, rank, world
        self.failed = 0
        self.consumed = 0
        if cond == "class" and not class_field:
            raise ValueError("cond 'class' needs cond.class_field (a field of each sample's json)")

    def _raw(self) -> Iterator[RawSample]:
        epoch = 0
        while True:
            order = list(self.shards)
            random.Random(self.seed + epoch).shuffle(order)
            mine = (
                order[self.rank :: self.world] or order
            )  # fewer shards than ranks: everyone reads all
            buffer: list[RawSample] = []
            rng = random.Random(self.seed * 1000 + epoch * 7 + self.rank)
            for shard in mine:
                for raw in shard_samples(shard):
                    buffer.append(raw)
                    if len(buffer) >= self.shuffle_buffer:
                        yield buffer.pop(rng.randrange(len(buffer)))
            rng.shuffle(buffer)
            yield from buffer
            epoch += 1

    def _decode(self, raw: RawSample) -> dict[str, Any]:
        if raw.error:
            raise ValueError(raw.error)
        if raw.image is None:
            raise ValueError("no image member")
        pixels, pil = load_image(raw.image, self.size)
        out: dict[str, Any] = {"image": pixels, "key": raw.key}
        if self.cond == "class":
            meta = raw.meta
            if self.class_field not in meta:
                raise ValueError(f"json has no class field {self.class_field!r}")
            value = meta[self.class_field]
            if isinstance(value, str):
                if not self.classes or value not in self.classes:
                    raise ValueError(f"class {value!r} not in cond.classes")
                value = self.classes.index(value)
            out["class"] = int(value)
        elif self.cond == "clip":
            if IMG_EMB in raw.other:
                out["emb"] = _vector(raw.other[IMG_EMB])
            elif self.clip_preprocess is not None:
                out["clip_pixels"] = self.clip_preprocess(pil)
            else:
                raise ValueError(f"no {IMG_EMB} member and no CLIP encoder to compute one")
            if TXT_EMB in raw.other:
                out["txt_emb"] = _vector(raw.other[TXT_EMB])
            out["caption"] = raw.caption or ""
        return out

    def iterate(self, skip: int = 0) -> Iterator[dict[str, Any]]:
        """Decoded samples, skipping the first `skip` raw samples (resume) without decoding them."""
        for i, raw in enumerate(self._raw()):
            if i < skip:
                continue
            try:
                sample = self._decode(raw)
            except (OSError, ValueError, SyntaxError) as err:
                self.failed += 1
                log.warning("%s: skipped sample (%s); %d skipped so far", raw.key, err, self.failed)
                continue
            self.consumed = i + 1
            yield sample


def batches(stream: Iterator[dict[str, Any]], batch_size: int) -> Iterator[dict[str, Any]]:
    """Collate consecutive samples into batches of tensors."""
    while True:
        items = [next(stream) for _ in range(batch_size)]
        batch: dict[str, Any] = {"image": torch.stack([it["image"] for it in items])}
        if "class" in items[0]:
            batch["class"] = torch.tensor([it["class"] for it in items])
        if all("emb" in it for it in items):
            batch["emb"] = torch.from_numpy(np.stack([it["emb"] for it in items]))
        elif all("clip_pixels" in it or "emb" in it for it in items) and any(
            "clip_pixels" in it for it in items
        ):
            batch["clip_pixels"] = [it.get("clip_pixels") for it in items]
            batch["emb_partial"] = [it.get("emb") for it in items]
        if "caption" in items[0]:
            batch["captions"] = [it["caption"] for it in items]
            if all("txt_emb" in it for it in items):
                batch["txt_emb"] = torch.from_numpy(np.stack([it["txt_emb"] for it in items]))
        yield batch
