"""Procedural image–text scenes: shapes × colours × count × position × size × background.

Nothing can be downloaded here, so this is the world Sieve's bundled models learn from and
the demo, tests and benchmarks are made of. Pure functions of a numpy Generator, so every
sample is reproducible from (seed, index): `make_sample` / `iter_samples` give pairs in
memory, `pipelines.generate` writes them as img2dataset shards.
"""

from __future__ import annotations

import glob
import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 220, 30),
    "orange": (250, 130, 20),
    "purple": (130, 40, 180),
    "pink": (255, 120, 190),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "brown": (120, 70, 30),
}
SHAPES: list[str] = ["circle", "square", "triangle", "star", "hexagon", "diamond", "cross"]
PLURALS = {"cross": "crosses"}
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
SIZES: dict[str, float] = {"small": 0.17, "medium": 0.27, "large": 0.4}
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "top left corner": (0.25, 0.25),
    "top right corner": (0.75, 0.25),
    "bottom left corner": (0.25, 0.75),
    "bottom right corner": (0.75, 0.75),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
}
POSITION_PHRASES = {
    "center": "in the center",
    "top": "at the top",
    "bottom": "at the bottom",
    "left": "on the left",
    "right": "on the right",
}
BACKGROUNDS = ["solid", "gradient", "noise"]
#: the noisy background's texture: (pixels per noise cell, standard deviation in grey levels).
#: "fine" is the default every bundled model learnt from; "coarse" is a blotchy texture that a
#: small CLIP can see (fine per-pixel noise is averaged away by its first layers), for
#: benchmarks of concepts that captions rarely name (`python -m bench.insight`).
NOISE_TEXTURES: dict[str, tuple[int, float]] = {"fine": (1, 28.0), "coarse": (4, 40.0)}
BACKGROUND_WORDS = {"solid": "plain", "gradient": "gradient", "noise": "noisy"}
SCATTERED = "scattered"

#: Words a generated watermark may say. Held-out words for evaluation live in the scorers.
WATERMARK_WORDS = [
    "shutterstock",
    "getty",
    "dreamstime",
    "alamy",
    "istock",
    "depositphotos",
    "123rf",
    "copyright",
    "sample",
    "preview",
    "(c) photo",
    "stock",
]


def _distance(a: Sequence[int], b: Sequence[int]) -> float:
    return math.dist(a, b)


def random_scene(rng: np.random.Generator, sizes: Sequence[str] | None = None) -> dict[str, Any]:
    """Draw the true attributes of one scene (the json written beside the image).

    `sizes` restricts the object sizes drawn (default all of SIZES): a 32² demo wants no
    5-pixel objects. Many objects are never large whatever `sizes` says.
    """
    sizes = list(SIZES) if sizes is None else list(sizes)
    bad = [s for s in sizes if s not in SIZES]
    if bad or not sizes:
        raise ValueError(f"object sizes must be a non-empty subset of {list(SIZES)}, got {sizes}")
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    count = int(rng.choice([1, 1, 1, 2, 3, 4]))
    size = sizes[rng.integers(len(sizes))]
    if count > 2 and size == "large":
        size = "medium"
    position = list(POSITIONS)[rng.integers(len(POSITIONS))] if count == 1 else SCATTERED
    if count == 1 and size == "large":
        position = "center" if rng.random() < 0.5 else position
    bg_choices = [c for c in COLORS if _distance(COLORS[c], COLORS[color]) > 150]
    bg_color = bg_choices[rng.integers(len(bg_choices))]
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    return {
        "shape": shape,
        "color": color,
        "count": count,
        "size": size,
        "position": position,
        "background": background,
        "bg_color": bg_color,
    }


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def ring(n: int, radius: float, offset: float) -> list[tuple[float, float]]:
        return [
            (
                cx + radius * math.cos(offset + 2 * math.pi * k / n),
                cy + radius * math.sin(offset + 2 * math.pi * k / n),
            )
            for k in range(n)
        ]

    if shape == "square":
        return ring(4, r * 1.25, math.pi / 4 + angle)
    if shape == "diamond":
        return [(cx, cy - r * 1.2), (cx + r * 0.8, cy), (cx, cy + r * 1.2), (cx - r * 0.8, cy)]
    if shape == "triangle":
        return ring(3, r * 1.2, -math.pi / 2 + angle)
    if shape == "hexagon":
        return ring(6, r * 1.1, angle)
    if shape == "star":
        outer, inner = (
            ring(5, r * 1.25, -math.pi / 2 + angle),
            ring(5, r * 0.5, -math.pi / 2 + math.pi / 5 + angle),
        )
        return [p for pair in zip(outer, inner) for p in pair]
    if shape == "cross":
        t = r * 0.38
        pts = [
            (-t, -r),
            (t, -r),
            (t, -t),
            (r, -t),
            (r, t),
            (t, t),
            (t, r),
            (-t, r),
            (-t, t),
            (-r, t),
            (-r, -t),
            (-t, -t),
        ]
        return [(cx + x, cy + y) for x, y in pts]
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _background(
    attrs: dict[str, Any], size: int, rng: np.random.Generator, noise_texture: str = "fine"
) -> Image.Image:
    base = np.array(COLORS[attrs["bg_color"]], dtype=np.float32)
    kind = attrs["background"]
    if kind == "solid":
        arr = np.broadcast_to(base, (size, size, 3)).copy()
    elif kind == "gradient":
        t = np.linspace(0.0, 1.0, size, dtype=np.float32)
        ramp = (0.55 + 0.45 * t)[:, None] if rng.random() < 0.5 else (0.55 + 0.45 * t)[None, :]
        arr = base[None, None, :] * ramp[..., None] + (1 - ramp[..., None]) * 0.35 * 255 * (
            base.mean() < 128
        )
    elif kind == "noise":
        if noise_texture not in NOISE_TEXTURES:
            raise ValueError(
                f"unknown noise texture {noise_texture!r}; expected one of {list(NOISE_TEXTURES)}"
            )
        grain, sd = NOISE_TEXTURES[noise_texture]
        cells = -(-size // grain)
        noise = rng.normal(0, sd, (cells, cells, 1)).astype(np.float32)
        if grain > 1:
            noise = np.repeat(np.repeat(noise, grain, axis=0), grain, axis=1)[:size, :size]
        arr = base[None, None, :] + noise
    else:
        raise ValueError(f"unknown background {kind!r}; expected one of {BACKGROUNDS}")
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _centres(attrs: dict[str, Any], rng: np.random.Generator) -> list[tuple[float, float]]:
    count, position = attrs["count"], attrs["position"]
    if count == 1:
        x, y = POSITIONS[position]
        jitter = 0.04 if attrs["size"] != "large" else 0.0
        return [(x + rng.uniform(-jitter, jitter), y + rng.uniform(-jitter, jitter))]
    cells = [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)]
    order = rng.permutation(len(cells))[:count]
    return [
        (cells[i][0] + rng.uniform(-0.05, 0.05), cells[i][1] + rng.uniform(-0.05, 0.05))
        for i in order
    ]


def render_scene(
    attrs: dict[str, Any], size: int, rng: np.random.Generator, noise_texture: str = "fine"
) -> Image.Image:
    """Render the scene described by attrs at size×size pixels
    (anti-aliased by 2× supersampling)."""
    ss = 2
    img = _background(attrs, size, rng, noise_texture).resize((size * ss, size * ss), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    fill = COLORS[attrs["color"]]
    outline = (0, 0, 0) if attrs["color"] != "black" else (90, 90, 90)
    r = SIZES[attrs["size"]] * size * ss / 2
    for cx, cy in _centres(attrs, rng):
        cx, cy = cx * size * ss, cy * size * ss
        if attrs["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=ss)
        else:
            angle = float(rng.uniform(-0.15, 0.15))
            draw.polygon(
                _polygon(attrs["shape"], cx, cy, r, angle), fill=fill, outline=outline, width=ss
            )
    return img.resize((size, size), Image.LANCZOS)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun(shape: str, count: int) -> str:
    """The word a caption uses for `count` of `shape` ("circle", "crosses")."""
    return shape if count == 1 else PLURALS.get(shape, shape + "s")


def make_caption(attrs: dict[str, Any], rng: np.random.Generator) -> tuple[str, list[str]]:
    """A natural-language caption and the attribute names it states (always colour and shape)."""
    color, shape, count, size = attrs["color"], attrs["shape"], attrs["count"], attrs["size"]
    noun_ = noun(shape, count)
    use_count = count > 1 or rng.random() < 0.3
    use_size = rng.random() < 0.4
    use_bg = rng.random() < 0.45
    use_pos = count == 1 and rng.random() < 0.45
    named = ["color", "shape"]
    adjectives = ([size] if use_size else []) + [color]
    if use_count:
        head = f"{COUNT_WORDS[count]} {' '.join(adjectives)} {noun_}"
        named.append("count")
    else:
        head = f"{_article(adjectives[0])} {' '.join(adjectives)} {noun_}"
    if use_size:
        named.append("size")
    tail = []
    if use_pos:
        pos = attrs["position"]
        tail.append(POSITION_PHRASES.get(pos, f"in the {pos}"))
        named.append("position")
    if use_bg:
        if rng.random() < 0.35:
            kind = BACKGROUND_WORDS[attrs["background"]]
            tail.append(f"on {_article(kind)} {kind} {attrs['bg_color']} background")
            named.append("background")
        else:
            tail.append(f"on {_article(attrs['bg_color'])} {attrs['bg_color']} background")
        named.append("bg_color")
    prefix = ["", "a picture of ", "an image showing ", "a photo of "][int(rng.integers(4))]
    body = prefix + " ".join([head] + tail)
    return body, named


def matches(attrs: dict[str, Any], named: Sequence[str], target: dict[str, Any]) -> bool:
    """Whether `target`'s true attributes agree with every attribute the
    caption of `attrs` names."""
    return all(attrs[name] == target[name] for name in named)


def available_fonts() -> list[str]:
    """Font identifiers usable offline: Pillow's built-in scalable font
    plus system TrueType files."""
    return ["default"] + sorted(glob.glob("/usr/share/fonts/truetype/**/*.ttf", recursive=True))


def load_font(name: str, size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Open a font from `available_fonts()` at a pixel size."""
    if name == "default":
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(name, size=size)


def add_watermark(
    img: Image.Image,
    rng: np.random.Generator,
    words: Sequence[str] | None = None,
    fonts: Sequence[str] | None = None,
    region: tuple[float, float, float, float] | None = None,
) -> Image.Image:
    """Overlay a visible text or logo watermark at random opacity, position and font size.

    `words`, `fonts` and `region` (x0, y0, x1, y1 as fractions of the image) restrict the
    draw, so that a detector can be evaluated on words, fonts and positions it never saw.
    """
    words = list(words or WATERMARK_WORDS)
    fonts = list(fonts or available_fonts()[:1])
    w, h = img.size
    x0, y0, x1, y1 = region or (0.0, 0.0, 1.0, 1.0)
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    alpha = int(rng.uniform(0.45, 0.9) * 255)
    shade = int(rng.choice([255, 235, 20]))
    colour = (shade, shade, shade, alpha)
    font = load_font(
        fonts[rng.integers(len(fonts))], int(rng.integers(max(8, h // 7), max(10, h // 3)))
    )
    text = words[rng.integers(len(words))]
    if rng.random() < 0.75:
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        px = rng.uniform(x0 * w, max(x0 * w, x1 * w - tw)) - left
        py = rng.uniform(y0 * h, max(y0 * h, y1 * h - th)) - top
        draw.text((px, py), text, font=font, fill=colour)
        if rng.random() < 0.3:  # tiled repeat across the image, as stock previews do
            draw.text((px, (py + h / 2) % h), text, font=font, fill=colour)
    else:  # a logo: ring + initials
        r = rng.uniform(0.12, 0.22) * min(w, h)
        cx = rng.uniform(x0 * w + r, max(x0 * w + r, x1 * w - r))
        cy = rng.uniform(y0 * h + r, max(y0 * h + r, y1 * h - r))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=max(1, int(r / 5)))
        small = load_font(fonts[rng.integers(len(fonts))], max(6, int(r)))
        draw.text((cx, cy), text[:2].upper(), font=small, fill=colour, anchor="mm")
    out = Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB")
    return out.filter(ImageFilter.SMOOTH) if rng.random() < 0.2 else out


@dataclass
class Sample:
    """One generated pair: the decoded image, its caption, and the true attributes (the json)."""

    key: str
    image: Image.Image
    caption: str
    attrs: dict[str, Any]


def sample_key(index: int, shard_size: int) -> str:
    """img2dataset's key for sample `index`: shard number then position, zero-padded."""
    shard, within = divmod(index, shard_size)
    digits = max(4, len(str(shard_size - 1)))
    return f"{shard:05d}{within:0{digits}d}"


def make_sample(
    index: int,
    size: int = 64,
    seed: int = 0,
    watermark_fraction: float = 0.0,
    shard_size: int = 1000,
    object_sizes: Sequence[str] | None = None,
    noise_texture: str = "fine",
) -> Sample:
    """The sample at `index` for `seed`: identical whatever the sharding or generation order."""
    rng = np.random.default_rng([seed, index])
    attrs = random_scene(rng, object_sizes)
    caption, named = make_caption(attrs, rng)
    image = render_scene(attrs, size, rng, noise_texture)
    watermark = bool(rng.random() < watermark_fraction)
    if watermark:
        image = add_watermark(image, rng)
    attrs.update(named=named, watermark=watermark, corrupt=False)
    return Sample(sample_key(index, shard_size), image, caption, attrs)


def iter_samples(
    n: int,
    size: int = 64,
    seed: int = 0,
    watermark_fraction: float = 0.0,
    start: int = 0,
    shard_size: int = 1000,
    object_sizes: Sequence[str] | None = None,
    noise_texture: str = "fine",
) -> Iterator[Sample]:
    """Yield n generated samples in memory (no disk), for training and evaluation scripts."""
    for index in range(start, start + n):
        yield make_sample(
            index, size, seed, watermark_fraction, shard_size, object_sizes, noise_texture
        )
