"""Perceptual hashes bit-identical to `imagehash.phash`, computed a batch at a time.

imagehash's steps are: grey ("L"), 32x32 Lanczos resize, 2-D DCT, low 8x8 block against
its median. For RGB arrays the first two are done here in numpy with Pillow's own integer
arithmetic (ITU-R 601 grey weights with 16-bit rounding; Lanczos weights in 22-bit fixed
point, rounded and clipped after each pass), so a chunk of small images is two matrix
products instead of two PIL calls and two copies per image. tests/test_shards.py
checks it against the installed Pillow on many shapes.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from PIL import Image

THUMB = 32
#: arrays up to this many pixels may be thumbnailed in numpy (stacked by shape); larger ones by PIL
NUMPY_MAX_PIXELS = 512 * 512
#: up to this many pixels stacking pays (one grey matmul for the chunk); above it one image at a
#: time with PIL's grey is cheaper (timed at 64 and 224 px with `python -m bench.embed_stages`)
BATCH_MAX_PIXELS = 96 * 96
_GREY = np.array([19595, 38470, 7471], np.float32)  # Pillow's rgb2l: (R, G, B) . w + 2^15 >> 16
_BITS = 22  # Pillow's PRECISION_BITS for 8-bit resampling: 32 - 8 - 2


def _dct_rows(n: int = THUMB, k: int = 8) -> np.ndarray:
    """First k rows of the unnormalised DCT-II matrix on n points (scipy.fftpack's default)."""
    return 2.0 * np.cos(np.pi * np.arange(k)[:, None] * (2 * np.arange(n)[None, :] + 1) / (2 * n))


_DCT = _dct_rows()


def _sinc(x: float) -> float:
    return 1.0 if x == 0.0 else math.sin(x * math.pi) / (x * math.pi)


def _lanczos(x: float) -> float:
    return _sinc(x) * _sinc(x / 3) if -3.0 <= x < 3.0 else 0.0


@functools.lru_cache(maxsize=128)
def lanczos_matrix(in_size: int, out_size: int = THUMB) -> np.ndarray:
    """(in_size, out_size) fixed-point Lanczos weights, as Pillow's precompute_coeffs makes them.

    Same double-precision steps in the same order (libm sin via `math`), then Pillow's
    round-half-away conversion to 22-bit integers, held in float64 so products stay exact.
    """
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = 3.0 * filterscale
    weights = np.zeros((in_size, out_size))
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        ss = 1.0 / filterscale  # a multiply by the reciprocal, as in C: dividing rounds differently
        xmin = max(int(center - support + 0.5), 0)
        count = min(int(center + support + 0.5), in_size) - xmin
        taps = [_lanczos((x + xmin - center + 0.5) * ss) for x in range(count)]
        total = 0.0
        for w in taps:
            total += w
        for x, w in enumerate(taps):
            w = w / total if total != 0.0 else w
            weights[xmin + x, xx] = int((-0.5 if w < 0 else 0.5) + w * (1 << _BITS))
    return weights


def _fixed_point(acc: np.ndarray) -> np.ndarray:
    """Pillow's clip8, in place: add half, shift right by 22 (a floor), clip to 0..255."""
    acc += 1 << (_BITS - 1)
    acc *= 2.0**-_BITS  # a power of two: exact
    np.floor(acc, out=acc)
    return np.clip(acc, 0, 255, out=acc)


def numpy_path(shape: tuple[int, ...]) -> bool:
    """Whether an RGB array of this shape is thumbnailed in numpy (else by PIL).

    Small, and no taller than wide: for those Pillow resizes horizontally first, then
    vertically, which is what `thumbnails` does. For taller images Pillow 13's result matches
    the vertical-first order on some shapes and the horizontal-first on others, so they go to
    PIL rather than to a guess (tests/test_shards.py covers both sides).
    """
    return len(shape) == 3 and shape[0] <= shape[1] and shape[0] * shape[1] <= NUMPY_MAX_PIXELS


def thumbnails(rgb: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 with H <= W -> (N, 32, 32) float64 grey Lanczos
    thumbnails, Pillow's bytes.

    Horizontal pass, then vertical, each rounded to 8 bits; an axis already 32 long is not
    resampled (Pillow's need_horizontal / need_vertical).
    """
    n, h, w, _ = rgb.shape
    if not numpy_path(rgb.shape[1:]):
        raise ValueError(f"thumbnails: {h}x{w} images go through PIL (see numpy_path)")
    # every partial sum is an integer below 2^24: exact in float32
    grey = rgb.reshape(-1, 3).astype(np.float32) @ _GREY
    grey += 32768
    grey *= 1 / 65536
    return _lanczos_grey(np.floor(grey, out=grey).reshape(n, h, w).astype(np.float64))


def batchable(shape: tuple[int, ...]) -> bool:
    """Whether an RGB array of this shape is best thumbnailed stacked with
    others (`thumbnails_of`)."""
    return numpy_path(shape) and shape[0] * shape[1] <= BATCH_MAX_PIXELS


def _lanczos_grey(grey: np.ndarray) -> np.ndarray:
    """The two Lanczos passes on (..., H, W) grey images
    (float64 of Pillow's L bytes), one or a stack."""
    h, w = grey.shape[-2:]
    if w != THUMB:
        grey = _fixed_point(grey @ lanczos_matrix(w))
    if h != THUMB:
        grey = _fixed_point(lanczos_matrix(h).T @ grey)
    return grey


def phash_pixels(img: Any) -> np.ndarray:
    """The 32x32 thumbnail of one image (PIL image of any mode, or an RGB HWC uint8 array)."""
    if isinstance(img, np.ndarray):
        if batchable(img.shape):
            return thumbnails(img[None])[0]
        if numpy_path(img.shape):
            # PIL's grey is Pillow's rgb2l itself, several times cheaper than the float matmul here
            return _lanczos_grey(
                np.asarray(Image.fromarray(img, "RGB").convert("L"), dtype=np.float64)
            )
        img = Image.fromarray(img, "RGB")

    return np.asarray(
        img.convert("L").resize((THUMB, THUMB), Image.Resampling.LANCZOS), dtype=np.float64
    )


def thumbnails_of(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """`phash_pixels` of many RGB arrays: small ones (`batchable`)
    stacked by shape, one call each."""
    out: list[Any] = [None] * len(arrays)
    groups: dict[tuple, list[int]] = {}
    for i, a in enumerate(arrays):
        if batchable(a.shape):
            groups.setdefault(a.shape, []).append(i)
        else:
            out[i] = phash_pixels(a)
    for idx in groups.values():
        for i, thumb in zip(idx, thumbnails(np.stack([arrays[i] for i in idx]))):
            out[i] = thumb
    return out


def phash_batch(thumbs: list[np.ndarray]) -> list[str]:
    """DCT perceptual hashes of 32x32 thumbnails, computed together (one matmul)."""
    if not thumbs:
        return []
    # scipy gives exact zeros on symmetric images
    low = np.round(_DCT @ np.stack(thumbs) @ _DCT.T, 6)
    low = low.reshape(len(thumbs), -1)
    bits = low > np.median(low, axis=1, keepdims=True)
    return [row.tobytes().hex() for row in np.packbits(bits, axis=1)]


def phash(img: Any) -> str:
    """DCT perceptual hash as 16 hex digits, bit-identical to `str(imagehash.phash(img))`.

    Same steps with a precomputed DCT matrix instead of scipy: a fifth of the cost, no
    scipy import per worker.
    """
    return phash_batch([phash_pixels(img)])[0]
