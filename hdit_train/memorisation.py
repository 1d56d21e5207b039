"""The memorisation audit: does a generator trained on a curated subset copy its training images?

Each generated image is embedded with the collection's CLIP and searched in the collection's
image index (`indices.search.Searcher`); its nearest training samples, their similarity and
a copy verdict per neighbour go into `audit.json`, with the fraction of generations that copy
a training image and a grid of the closest pairs (`closest_pairs.png`: generated | training).

The verdict is the rule of `curation.dedup --level copies`, called through
`curation.copies.copy_verdict`: the neighbours' pictures are read back from their source
shards and a pixel check decides (re-encoded, resized, cropped, colour-shifted or overlaid
copies count; another picture of the same kind does not), so the audit and the duplicates
report can never disagree about what a copy is.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from collection import images as source_images, schema as S
from collection.storage import write_bytes, write_json
from curation.copies import copy_verdict
from curation.dedup import COPY_MIN_COSINE
from indices.search import DEFAULT_COLUMNS, Searcher
from pipelines.phash import phash

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REPORT_FILE, GRID_FILE = "audit.json", "closest_pairs.png"


def phash_bits(a: str, b: str) -> int:
    """Hamming distance between two 16-hex-digit perceptual hashes."""
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def copy_verdicts(
    query: Image.Image, neighbours: Sequence[dict[str, Any]], pictures: dict[str, Image.Image]
) -> list[bool]:
    """Whether each neighbour (a search row with `key` and `similarity`) is a copy of the query
    image.

    The duplicates rule (`curation.copies.copy_verdict`) on the neighbours' pictures; one whose
    picture cannot be read back is not called a copy (the report marks it `picture: false`).
    """
    have = [r for r in neighbours if r.get(S.KEY) in pictures]
    verdicts = copy_verdict(
        query,
        [pictures[r[S.KEY]] for r in have],
        [float(r["similarity"]) for r in have],
        min_similarity=COPY_MIN_COSINE,
    )
    found = {id(r): v for r, v in zip(have, verdicts)}
    return [bool(found.get(id(r), False)) for r in neighbours]


@dataclass
class AuditResult:
    """The report (as written to audit.json) and where it went."""

    report: dict[str, Any]
    report_path: Path | None
    grid_path: Path | None

    @property
    def copy_fraction(self) -> float:
        return self.report["copy_fraction"]


def read_images(folder: str | Path) -> list[tuple[str, Image.Image]]:
    """(file name, RGB image) for every image file in a folder, sorted; a clear error when none
    or unreadable."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--images {folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"--images {folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    out = []
    for p in files:
        try:
            with Image.open(p) as im:
                out.append((p.name, im.convert("RGB")))
        except OSError as exc:
            raise ValueError(f"--images: {p} cannot be read as an image ({exc})") from None
    return out


def tensor_images(images: torch.Tensor, prefix: str = "sample") -> list[tuple[str, Image.Image]]:
    """(name, RGB image) for a (n, 3, H, W) batch in [-1, 1] (what the HDiT samplers return)."""
    arr = (
        images.detach()
        .clamp(-1, 1)
        .add(1)
        .mul(127.5)
        .round()
        .byte()
        .permute(0, 2, 3, 1)
        .cpu()
        .numpy()
    )
    return [(f"{prefix}_{i:04d}", Image.fromarray(a)) for i, a in enumerate(arr)]


def audit(
    images: Sequence[tuple[str, Image.Image]],
    collection: str,
    k: int = 5,
    out: str | Path | None = None,
    grid_pairs: int = 16,
    searcher: Searcher | None = None,
) -> AuditResult:
    """Audit generated images against a collection: nearest training samples, copy verdicts, the
    copy fraction; with `out`, write audit.json and closest_pairs.png there."""
    if not images:
        raise ValueError("audit: no images to audit")
    if k < 1:
        raise ValueError(f"audit: k must be >= 1, got {k}")
    searcher = searcher or Searcher(
        collection,
        columns=(
            *DEFAULT_COLUMNS,
            S.PHASH,
            S.SOURCE_SHARD,
            S.SOURCE_OFFSET,
            S.SOURCE_SIZE,
            S.SHA256,
        ),
    )
    if S.MODALITY_IMAGE not in searcher.modalities():
        raise ValueError(
            f"{collection}: no image index; build it with `python -m indices.build {collection}`"
        )
    vectors = searcher.encoder.encode_images([im for _, im in images])
    found = searcher.search_vectors(vectors, k=k, deduplicate=False)
    pictures = training_images([r for rows in found for r in rows])
    entries = []
    for (name, im), rows in zip(images, found):
        q = phash(im)
        verdicts = copy_verdicts(im, rows, pictures)
        neighbours = [
            {
                "key": r.get(S.KEY),
                "caption": r.get(S.CAPTION),
                "similarity": round(float(r["similarity"]), 5),
                "phash_bits": phash_bits(q, r[S.PHASH]) if r.get(S.PHASH) else None,
                "copy": v,
                "picture": r.get(S.KEY) in pictures,
                "source_shard": r.get(S.SOURCE_SHARD),
            }
            for r, v in zip(rows, verdicts)
        ]
        entries.append(
            {
                "image": name,
                "phash": q,
                "copy": any(verdicts),
                "nearest_similarity": neighbours[0]["similarity"] if neighbours else None,
                "neighbours": neighbours,
            }
        )
    copies = sum(e["copy"] for e in entries)
    report = {
        "collection": str(collection),
        "clip_model": searcher.encoder.spec,
        "k": k,
        "n_images": len(entries),
        "n_copies": copies,
        "copy_fraction": copies / len(entries),
        "rule": {
            "source": "curation.copies.copy_verdict (the dedup copies level)",
            "min_similarity": COPY_MIN_COSINE,
        },
        "nearest_similarity_mean": float(
            np.mean([e["nearest_similarity"] or 0.0 for e in entries])
        ),
        "images": entries,
    }
    report_path = grid_path = None
    if out is not None:
        out = Path(out)
        report_path = out / REPORT_FILE
        write_json(report_path, report)
        grid_path = write_pair_grid(images, entries, out / GRID_FILE, grid_pairs, pictures)
    log.info(
        "audit: %d of %d generations copy a training image (fraction %.3f)",
        copies,
        len(entries),
        report["copy_fraction"],
    )
    return AuditResult(report, report_path, grid_path)


def training_images(rows: Sequence[dict[str, Any]]) -> dict[str, Image.Image]:
    """The training images of some neighbour rows by key, read back from their source shards
    (`collection.images`: by byte range and checked by sha256 where the rows carry those)."""
    rows = [r for r in rows if r.get(S.KEY)]
    found: dict[str, Image.Image] = {}
    missing = 0
    for row, image in zip(rows, source_images.read_images(rows).found):
        if image.data is None:
            missing += 1
            log.debug("audit grid: no training image: %s", image.why)
            continue
        try:
            with Image.open(io.BytesIO(image.data)) as im:
                found[row[S.KEY]] = im.convert("RGB")
        except (OSError, SyntaxError, ValueError) as exc:
            missing += 1
            log.debug("audit grid: key %r does not decode (%s)", row[S.KEY], exc)
    if missing:  # a moved or unreadable shard: the grid shows a blank, the report is complete
        log.warning("audit grid: %d training images could not be read back", missing)
    return found


def write_pair_grid(
    images: Sequence[tuple[str, Image.Image]],
    entries: Sequence[dict[str, Any]],
    path: Path,
    pairs: int = 16,
    pictures: dict[str, Image.Image] | None = None,
) -> Path | None:
    """Closest pairs first, each [generated | nearest training sample]; a grey tile where a
    training image is gone. `pictures` (by key) are the training images already read; only the
    others are read here."""
    order = sorted(range(len(entries)), key=lambda i: -(entries[i]["nearest_similarity"] or -1.0))[
        :pairs
    ]
    order = [i for i in order if entries[i]["neighbours"]]
    if not order:
        return None
    nearest = [entries[i]["neighbours"][0] for i in order]
    pictures = pictures or {}
    train = {
        **training_images([n for n in nearest if n["key"] not in pictures]),
        **{n["key"]: pictures[n["key"]] for n in nearest if n["key"] in pictures},
    }
    side = max([images[i][1].size[0] for i in order] + [im.size[0] for im in train.values()])
    tiles = []
    for i in order:
        key = entries[i]["neighbours"][0]["key"]
        gen_im = images[i][1]
        train_im = train.get(key, Image.new("RGB", (side, side), (128, 128, 128)))
        tiles += [_tile(gen_im, side), _tile(train_im, side)]
    grid = make_grid(
        torch.stack(tiles), nrow=2 * max(1, min(4, len(order))), padding=2, pad_value=1.0
    )
    arr = grid.mul(255).round().byte().permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    write_bytes(path, buf.getvalue())
    return path


def _tile(im: Image.Image, side: int) -> torch.Tensor:
    im = im.resize((side, side), Image.NEAREST) if im.size != (side, side) else im
    return torch.from_numpy(np.asarray(im, np.float32) / 255).permute(2, 0, 1)
