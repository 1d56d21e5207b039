"""Re-read chosen samples' pictures from their source shards, as small thumbnails.

The collection keeps embeddings and hashes, not pixels; the copy check (curation.copies) needs
pixels for the candidate pairs only. One task per source shard reads the wanted images through
`collection.images` (by byte range where the rows carry one, else by scanning the shard; on a
local disk or an object store) and keeps them as thumbnails (a few KB each), so memory follows
the candidates, not the shards.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

import numpy as np

from collection import schema as S
from collection.images import SHARD_KINDS, read_images
from collection.shards import ShardOpenError
from curation.copies import thumbnail
from pipelines.decode import decode_image

log = logging.getLogger(__name__)

#: decoded pictures over this many pixels are refused from their header (the embed job's limit)
MAX_PIXELS = 178_956_970


def shard_thumbnails(rows: list[dict[str, Any]], ids: list[int]) -> dict[int, np.ndarray]:
    """{global id: thumbnail} of the rows (one source shard's, `collection.images.COLUMNS`) whose
    image could be read back; `ids` are their global ids.

    A shard that cannot be opened raises ShardOpenError naming it; a wanted image that is
    missing, changed or undecodable is simply absent from the result (the caller counts them).
    """
    batch = read_images(rows)
    if batch.found and all(f.kind in SHARD_KINDS for f in batch.found):
        raise ShardOpenError(batch.found[0].why)
    out: dict[int, np.ndarray] = {}
    for gid, found in zip(ids, batch.found):
        if found.data is None:
            continue
        image, _, _ = decode_image(found.data, MAX_PIXELS)
        if image is not None:
            out[gid] = thumbnail(image)
    return out


def load_thumbnails(
    keys: np.ndarray,
    shards: np.ndarray,
    ids: Iterable[int],
    run: Callable[[Callable[..., Any], list[tuple]], list[Any]],
    offsets: np.ndarray | None = None,
    sizes: np.ndarray | None = None,
    sha256: np.ndarray | None = None,
) -> dict[int, np.ndarray]:
    """Thumbnails of the samples `ids` (global ids into `keys` / `shards`), one task per source
    shard.

    `offsets`, `sizes` and `sha256` (by global id, where known) let the images be read by byte
    range and checked; without them each shard is scanned for its keys.
    `run(fn, argument tuples)` runs the tasks (in this process or on a Dask cluster).
    """
    by_shard: dict[str, tuple[list[dict[str, Any]], list[int]]] = {}
    for gid in sorted(set(int(i) for i in ids)):
        rows, gids = by_shard.setdefault(str(shards[gid]), ([], []))
        rows.append(
            {
                S.SOURCE_SHARD: str(shards[gid]),
                S.KEY: str(keys[gid]),
                S.SOURCE_OFFSET: _at(offsets, gid),
                S.SOURCE_SIZE: _at(sizes, gid),
                S.SHA256: _at(sha256, gid),
            }
        )
        gids.append(gid)
    out: dict[int, np.ndarray] = {}
    for part in run(shard_thumbnails, [by_shard[url] for url in sorted(by_shard)]):
        out.update(part)
    wanted = sum(len(gids) for _, gids in by_shard.values())
    missing = wanted - len(out)
    if missing:
        log.warning(
            "%d of %d pictures could not be re-read from their source shards; their pairs are not "
            "checked",
            missing,
            wanted,
        )
    return out


def _at(values: np.ndarray | None, i: int) -> Any:
    """values[i] as a plain value, None where unknown (no array, or a null / NaN cell)."""
    if values is None:
        return None
    value = values[i]
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return value.item() if hasattr(value, "item") else value
