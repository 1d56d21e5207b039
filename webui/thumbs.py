"""Thumbnails of result rows, read back from the collection's source shards.

A collection keeps no pixels: each row names its `source_shard`, so the image is read from
there and shrunk for the grid. Rows with the byte range the embed job recorded
(`source_offset`, `source_size`) are read by range, all of a shard's in one `cat_ranges`, and
checked against their `sha256`, so a grid costs its images' bytes whatever the shard's size;
the others (parquet or file sources, a shard that changed) are found by reading their shard
through `collection.shards`. A row whose shard is gone, unreadable or no longer holds its key
gets no thumbnail and a reason, never an error that stops the page.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

from PIL import Image

from collection import schema as S
from collection.shards import Shard, ShardOpenError, format_of, read_shard
from collection.storage import url_to_fs
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
    if (
        max(image.size) < size
    ):  # tiny generated images: enlarged with hard edges so the grid can show them
        scale = size / max(image.size)
        image = image.resize(
            (max(1, round(image.width * scale)), max(1, round(image.height * scale))),
            Image.Resampling.NEAREST,
        )
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return Thumb(buf.getvalue())


def _scan(url: str, keys: set[str]) -> tuple[dict[str, bytes], str]:
    """Image bytes of `keys` found by reading their source shard; (found, why the rest are missing)."""
    try:
        fs, path = url_to_fs(url)
        exists = fs.exists(path)
        is_dir = exists and fs.isdir(path)
    except (
        ImportError,
        ValueError,
        OSError,
    ) as exc:  # an fsspec protocol not installed, an unreachable store
        return {}, f"source shard {url} cannot be opened: {exc}"
    if not exists:
        return {}, f"source shard {url} is gone"
    found: dict[str, bytes] = {}
    try:
        for raw in read_shard(Shard(url, format_of(url, is_dir) or "webdataset")):
            if raw.key in keys and raw.image is not None:
                found[raw.key] = raw.image
                if len(found) == len(keys):
                    break
    except (ShardOpenError, OSError) as exc:
        return found, f"source shard {url} is unreadable: {exc}"
    return found, f"no longer in {url}"


def _by_range(url: str, rows: Sequence[dict[str, Any]], idx: list[int]) -> dict[int, bytes]:
    """Image bytes of the rows (positions `idx`) read by their recorded byte ranges, those whose
    bytes still hash to the recorded sha256; the rest are left for a scan."""
    try:
        fs, path = url_to_fs(url)
        starts = [int(rows[i][S.SOURCE_OFFSET]) for i in idx]
        ends = [s + int(rows[i][S.SOURCE_SIZE]) for s, i in zip(starts, idx)]
        blobs = fs.cat_ranges([path] * len(idx), starts, ends, on_error="return")
    except (ImportError, ValueError, OSError):  # the scan that follows names the problem
        return {}
    out = {}
    for i, start, end, blob in zip(idx, starts, ends, blobs):
        digest = rows[i].get(S.SHA256)
        if (
            isinstance(blob, bytes)
            and len(blob) == end - start
            and (not digest or hashlib.sha256(blob).hexdigest() == digest)
        ):
            out[i] = blob
    return out


def thumbnails(rows: Sequence[dict[str, Any]], size: int = THUMB_SIZE) -> list[Thumb]:
    """One Thumb per row, in order; rows are grouped by shard so each shard is read once."""
    by_shard: dict[str, list[int]] = defaultdict(list)
    out: list[Thumb] = [Thumb(None, "no source shard recorded")] * len(rows)
    for i, row in enumerate(rows):
        if row.get(S.SOURCE_SHARD) and row.get(S.KEY) is not None:
            by_shard[row[S.SOURCE_SHARD]].append(i)
    for url, idx in by_shard.items():
        ranged = [
            i
            for i in idx
            if rows[i].get(S.SOURCE_OFFSET) is not None and rows[i].get(S.SOURCE_SIZE) is not None
        ]
        data = _by_range(url, rows, ranged) if ranged else {}
        rest = [i for i in idx if i not in data]
        if rest:
            found, why = _scan(url, {str(rows[i][S.KEY]) for i in rest})
            for i in rest:
                blob = found.get(str(rows[i][S.KEY]))
                out[i] = _jpeg(blob, size) if blob is not None else Thumb(None, why)
        for i, blob in data.items():
            out[i] = _jpeg(blob, size)
    return out
