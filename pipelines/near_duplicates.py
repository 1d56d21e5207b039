"""Transformed copies of a picture: what a web crawl holds many of, planted with known truth.

`pipelines.generate --near-duplicate-fraction F` replaces that fraction of samples by a copy of
an earlier sample (its json says `dup_of` and `transform`), so that the duplicate finders of
`curation.dedup` are measured against known answers (`python -m bench.insight`).
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance

from models.scenes import add_watermark

#: The transforms a planted copy gets, one per copy, drawn uniformly. `exact` repeats the
#: original's bytes; the others re-encode what they changed as JPEG.
TRANSFORMS: tuple[str, ...] = (
    "exact",
    "reencoded",
    "resized",
    "cropped",
    "colour-shifted",
    "overlaid",
)
ORIGINAL_QUALITY = 92  # pipelines.generate's JPEG quality


def jpeg(image: Image.Image, quality: int = ORIGINAL_QUALITY) -> bytes:
    """JPEG bytes of an RGB image, as the sample writer encodes them."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def _reencoded(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, int]:
    return image, int(rng.integers(30, 76))  # what a re-upload at a lower quality looks like


def _resized(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, int]:
    w, h = image.size
    scale = float(rng.choice([0.6, 0.75, 1.25, 1.5]))
    size = (max(8, round(w * scale)), max(8, round(h * scale)))
    return image.resize(
        size, Image.Resampling.BILINEAR if scale > 1 else Image.Resampling.LANCZOS
    ), ORIGINAL_QUALITY


def _cropped(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, int]:
    w, h = image.size
    cw, ch = round(w * rng.uniform(0.8, 0.92)), round(h * rng.uniform(0.8, 0.92))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return image.crop((x, y, x + cw, y + ch)), ORIGINAL_QUALITY


def _colour_shifted(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, int]:
    out = ImageEnhance.Brightness(image).enhance(rng.uniform(0.8, 1.2))
    out = ImageEnhance.Contrast(out).enhance(rng.uniform(0.8, 1.2))
    out = ImageEnhance.Color(out).enhance(rng.uniform(0.6, 1.4))
    return out, ORIGINAL_QUALITY


def _overlaid(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, int]:
    return add_watermark(image, rng), ORIGINAL_QUALITY  # a stock-photo re-post: text or logo on top


_APPLY: dict[str, Callable[[Image.Image, np.random.Generator], tuple[Image.Image, int]]] = {
    "reencoded": _reencoded,
    "resized": _resized,
    "cropped": _cropped,
    "colour-shifted": _colour_shifted,
    "overlaid": _overlaid,
}


def make_copy(
    data: bytes, rng: np.random.Generator, transform: str | None = None
) -> tuple[bytes, str, tuple[int, int]]:
    """(JPEG bytes, transform name, (width, height)) of a copy of the picture whose file is `data`.

    The copy is made from the decoded file, as a re-upload would be. `transform` picks one of
    TRANSFORMS; None draws one from `rng`.
    """
    transform = transform or TRANSFORMS[int(rng.integers(len(TRANSFORMS)))]
    image = Image.open(io.BytesIO(data)).convert("RGB")
    if transform == "exact":
        return data, transform, image.size
    if transform not in _APPLY:
        raise ValueError(f"unknown transform {transform!r}; expected one of {TRANSFORMS}")
    out, quality = _APPLY[transform](image, rng)
    return jpeg(out, quality), transform, out.size
