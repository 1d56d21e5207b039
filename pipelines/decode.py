"""Turn one raw input sample into a metadata row and, when usable, a decoded RGB image.

Every failure is a status from `curation.schema` with a message, never an exception, so a
bad sample costs one row and nothing else.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from typing import Any

import numpy as np

from curation import schema as S
from pipelines.phash import batchable, phash, phash_batch, phash_pixels, thumbnails_of
from pipelines.readers import RawSample

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
_FIXED = frozenset(S.METADATA_COLUMNS)
_CONSUMED_SET = frozenset(_CONSUMED)
_EMPTY_ROW = dict.fromkeys(S.METADATA_COLUMNS)


def source_fields(meta: dict[str, Any]) -> dict[str, Any]:
    """The source's own json fields, renamed `src_<name>` where they collide with ours."""
    return {(SOURCE_PREFIX + name if name in _FIXED else name): value
            for name, value in meta.items() if name not in _CONSUMED_SET}


def empty_row(raw: RawSample, source_shard: str) -> dict[str, Any]:
    """A row with every fixed column present (scores and embeddings still unknown)."""
    row: dict[str, Any] = _EMPTY_ROW.copy()
    url = raw.meta.get(S.URL)
    row.update({S.KEY: raw.key, S.CAPTION: raw.caption, S.URL: str(url) if url is not None else None,
                S.SOURCE_SHARD: source_shard, S.STATUS: S.STATUS_OK})
    row.update(source_fields(raw.meta))
    return row


def _fail(row: dict[str, Any], status: str, error: str) -> None:
    row[S.STATUS] = status
    row[S.ERROR] = error


def _fast_jpeg(data: bytes, max_pixels: int) -> np.ndarray | None:
    """A colour JPEG decoded by simplejpeg (libjpeg-turbo's TurboJPEG API), or None to use PIL.

    For the small images of a typical shard PIL's per-image set-up costs more than the decode
    itself: simplejpeg is about 2.7x cheaper here (bench/embed_stages.py) and gives PIL's pixels
    (same library, same accurate IDCT and fancy upsampling; tests/test_readers.py). Only
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
    from PIL import Image

    fast = _fast_jpeg(data, max_pixels)
    if fast is not None:
        return Image.fromarray(fast, "RGB"), None, None
    return _pil_decode(data, max_pixels)


def _pil_decode(data: bytes, max_pixels: int):
    """PIL for every format the fast path does not take; the source of every error message."""
    from PIL import Image, UnidentifiedImageError

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


def decode_sample(raw: RawSample, source_shard: str, max_pixels: int = DEFAULT_MAX_PIXELS,
                  defer_phash: bool = False):
    """One raw sample -> (row, RGB HWC uint8 array or None). The row's status says why there is none.

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
        row[PHASH_PENDING] = phash_pixels(pixels)  # now: a larger image is not held until the chunk ends
    if raw.caption is None or not raw.caption.strip():
        _fail(row, S.STATUS_MISSING_CAPTION, "sample has no caption" if raw.caption is None
              else "caption is empty")
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


def batch_normalizer(preprocess: Any):
    """(size, mean, std) when `preprocess` is open_clip's resize/crop/to-tensor/normalize chain.

    For an RGB image already size x size those steps are identity resize and crop, /255 and
    normalize, so a whole batch can be done as one tensor op (`normalize_batch`) instead of
    torchvision per image. Returns None for any other chain (the caller keeps `preprocess`).
    """
    names = [type(t).__name__ for t in getattr(preprocess, "transforms", [])]
    expected = ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    kept = [n for n in names if n not in ("MaybeConvertMode", "_convert_to_rgb", "function")]
    kept = ["ToTensor" if n == "MaybeToTensor" else n for n in kept]
    if kept != expected:
        return None
    resize, crop, norm = preprocess.transforms[0], preprocess.transforms[1], preprocess.transforms[-1]
    size = resize.size if isinstance(resize.size, int) else None
    if isinstance(resize.size, (list, tuple)) and len(resize.size) == 1:
        size = resize.size[0]
    if size is None or tuple(crop.size) != (size, size) or getattr(resize, "max_size", None):
        return None
    return size, tuple(float(m) for m in norm.mean), tuple(float(s) for s in norm.std)


def resize_crop(preprocess: Any):
    """The chain's Resize then CenterCrop as one PIL -> PIL callable, when `batch_normalizer` takes the chain.

    An RGB image of any other size then goes through these two PIL steps and joins the
    batched normalisation as a uint8 array: the same values as the whole chain (ToTensor is
    /255 of those pixels), without torchvision's per-image tensor ops, which cost about as
    much again as the resize (bench.embed_gpu). Returns None for any other chain.
    """
    if batch_normalizer(preprocess) is None:
        return None
    steps = {type(t).__name__: t for t in preprocess.transforms}
    resize, crop = steps["Resize"], steps["CenterCrop"]
    return lambda img: crop(resize(img))


def fits(img: Any, size: int) -> bool:
    """Whether `img` (an RGB HWC array or a PIL image) can take the batched path: RGB, size x size."""
    if isinstance(img, np.ndarray):
        return img.shape == (size, size, 3)
    return img.mode == "RGB" and img.size == (size, size)


def normalize_batch(arrays: list[np.ndarray], mean, std):
    """Stacked HWC uint8 arrays -> NCHW float32, the same values as ToTensor + Normalize."""
    import torch

    hwc = torch.from_numpy(np.stack(arrays))
    n, h, w, c = hwc.shape
    batch = torch.empty((n, c, h, w), dtype=torch.float32)
    batch.copy_(hwc.permute(0, 3, 1, 2))  # layout and dtype in one pass, no uint8 NCHW copy
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return batch.div_(255).sub_(m).div_(s)
