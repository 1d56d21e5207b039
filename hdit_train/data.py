"""Training input: webdataset shards, plain img2dataset ones or Sieve exports with embeddings.

A sample is the group of adjacent tar members sharing a key ({key}.jpg/.txt/.json and, in
exports, {key}.img_emb.npy/.txt_emb.npy). Undecodable samples are logged and counted, never
crash the run. The stream is deterministic for a (seed, rank, world) so `--resume` can skip
exactly the samples already consumed.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import random
import tarfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def list_shards(data: str | Path) -> list[Path]:
    """Tar shards of a folder, a single tar, or a glob pattern, sorted."""
    p = Path(data)
    if p.is_dir():
        shards = sorted(p.glob("*.tar"))
    elif p.is_file():
        shards = [p]
    else:
        shards = sorted(Path(s) for s in glob.glob(str(data)))
    if not shards:
        raise FileNotFoundError(f"no webdataset .tar shards found at {data}")
    return shards


def read_manifest(data: str | Path) -> dict[str, Any] | None:
    """The export's manifest.json next to the shards, or None for plain img2dataset shards."""
    p = Path(data)
    folder = p if p.is_dir() else list_shards(data)[0].parent
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def data_hash(data: str | Path) -> str:
    """The export manifest's own hash if it has one, else a hash of shard names and sizes."""
    manifest = read_manifest(data)
    if manifest:
        for key in ("hash", "spec_hash", "subset_hash", "manifest_hash"):
            if isinstance(manifest.get(key), str):
                return manifest[key]
        return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    h = hashlib.sha256()
    for shard in list_shards(data):
        h.update(f"{shard.name}:{shard.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def manifest_clip_spec(manifest: dict[str, Any] | None) -> str | None:
    """The CLIP model an export's embeddings came from, if the manifest names one."""
    if not manifest:
        return None
    for key in ("clip_model", "clip_spec", "clip"):
        if isinstance(manifest.get(key), str):
            return manifest[key]
    return None


def iter_tar_samples(shard: Path) -> Iterator[dict[str, bytes]]:
    """Raw samples of one tar: {"__key__", "__shard__", ext: bytes} per adjacent key group."""
    current: dict[str, Any] = {}
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name.rsplit("/", 1)[-1]
                if "." not in name or name.startswith("."):
                    continue
                key, ext = name.split(".", 1)
                if current and current["__key__"] != key:
                    yield current
                    current = {}
                current.setdefault("__key__", key)
                current["__shard__"] = shard.name
                current[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        log.warning("%s: unreadable tar after %s (%s); skipping the rest of this shard",
                    shard, current.get("__key__", "start"), err)
    if current:
        yield current


def load_image(raw: bytes, size: int):
    """Decode, resize the short side to size and centre-crop; float tensor in [-1, 1], CHW, and
    the decoded image at its stored size (what CLIP embeds, as the embed pipeline does)."""
    import torch

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
    for shard in list_shards(data):
        for raw in iter_tar_samples(shard):
            image_ext = next((e for e in IMAGE_EXTS if e in raw), None)
            if image_ext is None or "txt" not in raw:
                continue
            if "img_emb.npy" in raw and "txt_emb.npy" in raw:
                imgs.append(np.load(io.BytesIO(raw["img_emb.npy"])).astype(np.float32).reshape(-1))
                txts.append(np.load(io.BytesIO(raw["txt_emb.npy"])).astype(np.float32).reshape(-1))
            else:
                try:
                    pixels.append(Image.open(io.BytesIO(raw[image_ext])).convert("RGB"))
                except (OSError, SyntaxError, ValueError):
                    continue
                captions.append(raw["txt"].decode("utf-8", "replace"))
            if len(imgs) + len(pixels) >= n:
                break
        if len(imgs) + len(pixels) >= n:
            break
    if pixels:
        imgs.extend(encoder.encode_images(pixels))
        txts.extend(encoder.encode_texts(captions))
    if not imgs:
        raise ValueError(f"{data}: no samples with both an image and a caption to measure the modality gap")
    return np.mean(imgs, axis=0) - np.mean(txts, axis=0)


class ShardStream:
    """Endless, deterministic, shuffled stream of decoded samples for one rank.

    cond: "none", "class" (class_field of the json, mapped by `classes` if it is a string) or
    "clip" (stored img_emb.npy, else the CLIP-preprocessed pixels for the trainer to embed).
    """

    def __init__(self, data: str | Path, size: int, cond: str = "none", class_field: str | None = None,
                 classes: list[str] | None = None, clip_preprocess=None, seed: int = 0,
                 shuffle_buffer: int = 1000, rank: int = 0, world: int = 1):
        self.shards = list_shards(data)
        self.size, self.cond, self.class_field, self.classes = size, cond, class_field, classes
        self.clip_preprocess = clip_preprocess
        self.seed, self.shuffle_buffer, self.rank, self.world = seed, shuffle_buffer, rank, world
        self.failed = 0
        self.consumed = 0
        if cond == "class" and not class_field:
            raise ValueError("cond 'class' needs cond.class_field (a field of each sample's json)")

    def _raw(self) -> Iterator[dict[str, Any]]:
        epoch = 0
        while True:
            order = list(self.shards)
            random.Random(self.seed + epoch).shuffle(order)
            mine = order[self.rank::self.world] or order  # fewer shards than ranks: everyone reads all
            buffer: list[dict[str, Any]] = []
            rng = random.Random(self.seed * 1000 + epoch * 7 + self.rank)
            for shard in mine:
                for raw in iter_tar_samples(shard):
                    buffer.append(raw)
                    if len(buffer) >= self.shuffle_buffer:
                        yield buffer.pop(rng.randrange(len(buffer)))
            rng.shuffle(buffer)
            yield from buffer
            epoch += 1

    def _decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        image_ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if image_ext is None:
            raise ValueError("no image member")
        pixels, pil = load_image(raw[image_ext], self.size)
        out: dict[str, Any] = {"image": pixels, "key": raw["__key__"]}
        if self.cond == "class":
            meta = json.loads(raw.get("json", b"{}"))
            if self.class_field not in meta:
                raise ValueError(f"json has no class field {self.class_field!r}")
            value = meta[self.class_field]
            if isinstance(value, str):
                if not self.classes or value not in self.classes:
                    raise ValueError(f"class {value!r} not in cond.classes")
                value = self.classes.index(value)
            out["class"] = int(value)
        elif self.cond == "clip":
            if "img_emb.npy" in raw:
                out["emb"] = np.load(io.BytesIO(raw["img_emb.npy"])).astype(np.float32).reshape(-1)
            elif self.clip_preprocess is not None:
                out["clip_pixels"] = self.clip_preprocess(pil)
            else:
                raise ValueError("no img_emb.npy member and no CLIP encoder to compute one")
            if "txt_emb.npy" in raw:
                out["txt_emb"] = np.load(io.BytesIO(raw["txt_emb.npy"])).astype(np.float32).reshape(-1)
            out["caption"] = raw.get("txt", b"").decode("utf-8", "replace")
        return out

    def iterate(self, skip: int = 0) -> Iterator[dict[str, Any]]:
        """Decoded samples, skipping the first `skip` raw samples (resume) without decoding them."""
        for i, raw in enumerate(self._raw()):
            if i < skip:
                continue
            try:
                sample = self._decode(raw)
            except (OSError, ValueError, json.JSONDecodeError, SyntaxError) as err:
                self.failed += 1
                log.warning("%s/%s: skipped sample (%s); %d skipped so far",
                            raw.get("__shard__"), raw.get("__key__"), err, self.failed)
                continue
            self.consumed = i + 1
            yield sample


def batches(stream: Iterator[dict[str, Any]], batch_size: int) -> Iterator[dict[str, Any]]:
    """Collate consecutive samples into batches of tensors."""
    import torch

    while True:
        items = [next(stream) for _ in range(batch_size)]
        batch: dict[str, Any] = {"image": torch.stack([it["image"] for it in items])}
        if "class" in items[0]:
            batch["class"] = torch.tensor([it["class"] for it in items])
        if all("emb" in it for it in items):
            batch["emb"] = torch.from_numpy(np.stack([it["emb"] for it in items]))
        elif all("clip_pixels" in it or "emb" in it for it in items) and any("clip_pixels" in it for it in items):
            batch["clip_pixels"] = [it.get("clip_pixels") for it in items]
            batch["emb_partial"] = [it.get("emb") for it in items]
        if "caption" in items[0]:
            batch["captions"] = [it["caption"] for it in items]
            if all("txt_emb" in it for it in items):
                batch["txt_emb"] = torch.from_numpy(np.stack([it["txt_emb"] for it in items]))
        yield batch
