"""Thumbnails of result rows, read back from the collection's source shards.

A collection keeps no pixels: each row's image is read back through `collection.images` (by
its recorded byte range, else by scanning its shard, checked against its sha256), on a local
disk or an object store, and shrunk for the grid. A row whose shard is gone, unreadable or no
longer holds its image gets no thumbnail and a reason, never an error that stops the page.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any, Sequence

from PIL import Image

from collection.images import read_images
from pipelines.decode import DEFAULT_MAX_PIXELS, decode_image

log = logging.getLogger(__name__)

#: longest side of a grid thumbnail, in pixels
THUMB_SIZE = 160


@dataclass(frozen=True)
class Thumb:
    """A thumbnail's JPEG bytes, or why there is none."""

    jpeg: bytes | None
    why: str = ""


def _jpeg(data: bytes, size: int) -> Thumb:
    image, _, error = decode_image(data, DEFAULT_MAX_PIXELS)
    if image is None:
        return Thumb(None, f"undecodable: {error}")
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    if max(image.size) < size:  # tiny generated images: enlarged with hard edges for the grid
        scale = size / max(image.size)
        image = image.resize(
            (max(1, round(image.width * scale)), max(1, round(image.height * scale))),
            Image.Resampling.NEAREST,
        )
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return Thumb(buf.getvalue())


def thumbnails(rows: Sequence[dict[str, Any]], size: int = THUMB_SIZE) -> list[Thumb]:
    """One Thumb per row, in order (rows carry `collection.images.COLUMNS`)."""
    batch = read_images(rows)
    return [_jpeg(f.data, size) if f.data is not None else Thumb(None, f.why) for f in batch.found]
