"""Turn one raw input sample into a metadata row and, when usable, a decoded RGB image.

Every failure is a status from `collection.schema` with a message, never an exception, so a
bad sample costs one row and nothing else.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from collection import schema as S
from collection.shards import RawSample
from pipelines.phash import batchable, phash, phash_batch, phash_pixels, thumbnails_of

try:  # a dependency, but only a speed-up: PIL alone decodes everything (see _fast_jpeg)
    import simplejpeg as _simplejpeg
except ImportError:
    _simplejpeg = None

#: default pixel limit: PIL's own bomb threshold, checked from the header before decoding
DEFAULT_MAX_PIXELS = 89_478_485
#: source fields consumed into fixed columns instead of being kept under their own names
_CONSUMED = (S.KEY, S.CAPTION, S.URL)
#: prefix for source fields whose names collide with a fixed column (e.g. img2dataset's `status`)
SOURCE_PREFIX = "src_"
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
#: row key holding a deferred phash thumbnail until `finish_phashes` (never written)
PHASH_PENDING = "_phash_pending"
_FIXED = S.RESERVED_COLUMNS
_CONSUMED_SET = frozenset(_CONSUMED)
_EMPTY_ROW = dict.fromkeys(S.METADATA_COLUMNS)


def source_fields(meta: dict[str, Any]) -> dict[str, Any]:
    """The source's own json fields, renamed `src_<name>` where they collide with ours."""
    return {
        (SOURCE_PREFIX + name if name in _FIXED else name): value
        for name, value in meta.items()
        if name not in _CONSUMED_SET
    }


def empty_row(raw: RawSample, source_shard: str) -> dict[str, Any]:
    """A row with every fixed column present (scores and embeddings still unknown)."""
    row: dict[str, Any] = _EMPTY_ROW.copy()
    url = raw.meta.get(S.URL)
    row.update(
        {
            S.KEY: raw.key,
            S.CAPTION: raw.caption,
            S.URL: str(url) if url is not None else None,
            S.SOURCE_SHARD: source_shard,
            S.SOURCE_OFFSET: raw.offset,
            S.SOURCE_SIZE: raw.size,
            S.STATUS: S.STATUS_OK,
        }
    )
    row.update(source_fields(raw.meta))
    return row


def _fail(row: dict[str, Any], status: str, error: str) -> None:
    row[S.STATUS] = status
    row[S.ERROR] = error


def _fast_jpeg(data: bytes, max_pixels: int) -> np.ndarray | None:
    """A colour JPEG decoded by simplejpeg (libjpeg-turbo's TurboJPEG API), or None to use PIL.

    For the small images of a typical shard PIL's per-image set-up costs more than the decode
    itself: simplejpeg is cheaper (bench/results/embed_stages.json) and gives PIL's pixels
    (same library, same accurate IDCT and fancy upsampling; tests/test_shards.py). Only
    YCbCr files take this path; anything else, and any error, goes to PIL, which then gives
    the canonical status and message.
    """
    if _simplejpeg is None or data[:2] != b"\xff\xd8":
        return None
    try:
        height, width, colorspace, _ = _simplejpeg.decode_jpeg_header(data)
        if colorspace != "YCbCr" or width * height > max_pixels:
            return None
        return _simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False)
    except ValueError:
        return None


def decode_pixels(data: bytes, max_pixels: int):
    """Decode to an RGB HWC uint8 array, refusing images over `max_pixels` from their header alone.

    The worker batches arrays (normalise, hash thumbnails), so a JPEG on the fast path never
    becomes a PIL image. Returns (array, None, None) or (None, status, message).
    """
    fast = _fast_jpeg(data, max_pixels)
    if fast is not None:
        return fast, None, None
    img, status, error = _pil_decode(data, max_pixels)
    return (None, status, error) if img is None else (np.asarray(img), None, None)


def decode_image(data: bytes, max_pixels: int):
    """`decode_pixels` as a PIL RGB image: (image, None, None) or (None, status, message)."""
    fast = _fast_jpeg(data, max_pixels)
    if fast is not None:
        return Image.fromarray(fast, "RGB"), None, None
    return _pil_decode(data, max_pixels)


def _pil_decode(data: bytes, max_pixels: int):
    """PIL for every format the fast path does not take; the source of every error message."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                return None, S.STATUS_TOO_LARGE, f"{w}x{h} = {w * h} pixels > limit {max_pixels}"
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return None, S.STATUS_TOO_LARGE, str(exc)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        # drop object addresses ("<_io.BytesIO object at 0x..>") so reruns give identical rows
        return None, S.STATUS_DECODE_ERROR, _ADDRESS.sub("", f"{type(exc).__name__}: {exc}")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img, None, None


def decode_sample(
    raw: RawSample,
    source_shard: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    defer_phash: bool = False,
):
    """One raw sample -> (row, RGB HWC uint8 array or None). The row's
    status says why there is none.

    Order of checks: the shard broke inside it, no image member, image not decodable or too
    large, no caption. A missing caption still gets width/height/hashes (the image is fine)
    but no embeddings: the pair is what the collection is about. With `defer_phash` the row
    holds the image (or, off the numpy path, its thumbnail) under PHASH_PENDING for
    `finish_phashes` to hash a chunk at a time.
    """
    row = empty_row(raw, source_shard)
    if raw.error is not None:
        _fail(row, S.STATUS_READ_ERROR, raw.error)
        return row, None
    if raw.image is None:
        _fail(row, S.STATUS_MISSING_IMAGE, "sample has no image")
        return row, None
    row[S.SHA256] = hashlib.sha256(raw.image).hexdigest()
    pixels, status, error = decode_pixels(raw.image, max_pixels)
    if pixels is None:
        _fail(row, status, error)
        return row, None
    row[S.HEIGHT], row[S.WIDTH] = pixels.shape[:2]
    if not defer_phash:
        row[S.PHASH] = phash(pixels)
    elif batchable(pixels.shape):
        row[PHASH_PENDING] = pixels  # thumbnailed with the chunk's other small images
    else:
        # now: a larger image is not held until the chunk ends
        row[PHASH_PENDING] = phash_pixels(pixels)
    if raw.caption is None or not raw.caption.strip():
        _fail(
            row,
            S.STATUS_MISSING_CAPTION,
            "sample has no caption" if raw.caption is None else "caption is empty",
        )
        return row, None
    return row, pixels


def finish_phashes(rows: list[dict[str, Any]]) -> None:
    """Replace what `decode_sample(defer_phash=True)` left under PHASH_PENDING with the hashes."""
    pending = [row for row in rows if PHASH_PENDING in row]
    held = [row.pop(PHASH_PENDING) for row in pending]
    small = [i for i, x in enumerate(held) if x.ndim == 3]
    for i, thumb in zip(small, thumbnails_of([held[i] for i in small])):
        held[i] = thumb
    for row, value in zip(pending, phash_batch(held)):
        row[S.PHASH] = value
