"""Watermark training/evaluation data: generated scenes, half of them overlaid, in two regimes
whose words, fonts and positions are disjoint, so the benchmark measures generalisation.

- train: the sample generator's WATERMARK_WORDS; Pillow's scalable default font plus the
  DejaVu *Sans* TrueType faces; overlays anchored in the top-left or bottom-right region.
- heldout: HELDOUT_WORDS (none shared with training); the remaining TrueType faces (DejaVu
  Serif, Mono, Math); overlays anchored in the top-right or bottom-left region.
Without system TrueType fonts both regimes fall back to the default font (recorded in
`regime_fonts`). Both classes get the same JPEG round trip and occasional blur, so the
detector cannot learn compression or smoothing as a shortcut.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

from models.scenes import WATERMARK_WORDS, add_watermark, available_fonts, make_sample

HELDOUT_WORDS = [
    "adobestock",
    "pixabay",
    "unsplash",
    "watermark",
    "photo by jo",
    "proof",
    "licensed",
    "www.pics.net",
    "draft",
    "(c) 2024",
    "bigstock",
    "fotolia",
    "PREVIEW ONLY",
]
REGIONS = {
    "train": [(0.0, 0.0, 0.55, 0.55), (0.45, 0.45, 1.0, 1.0)],
    "heldout": [(0.5, 0.0, 1.0, 0.5), (0.0, 0.5, 0.5, 1.0)],
}


def regime_fonts(regime: str) -> list[str]:
    """Fonts of a regime (see module doc); the two lists are disjoint when TTFs are installed."""
    ttfs = [f for f in available_fonts() if f != "default"]
    train = ["default"] + [f for f in ttfs if "/DejaVuSans" in f and "Mono" not in f]
    held = [f for f in ttfs if f not in train]
    if regime == "train":
        return train
    if regime == "heldout":
        return held or ["default"]
    raise ValueError(f"regime must be 'train' or 'heldout', got {regime!r}")


def regime_words(regime: str) -> list[str]:
    """Overlay words of a regime: the generator's own for training, HELDOUT_WORDS otherwise."""
    return list(WATERMARK_WORDS) if regime == "train" else list(HELDOUT_WORDS)


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def make_example(index: int, regime: str, seed: int, size: int = 64) -> tuple[Image.Image, int]:
    """Example `index` of a regime: (image, label); even-odd label split keeps classes balanced."""
    rng = np.random.default_rng([seed, index, 7])
    img = make_sample(index, size=size, seed=seed).image
    label = index % 2
    if label:
        regions = REGIONS[regime]
        img = add_watermark(
            img,
            rng,
            words=regime_words(regime),
            fonts=regime_fonts(regime),
            region=regions[rng.integers(len(regions))],
        )
    elif rng.random() < 0.2:
        img = img.filter(ImageFilter.SMOOTH)
    return _jpeg(img, int(rng.integers(60, 96))), label
