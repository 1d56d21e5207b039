"""Re-read chosen samples' pictures from their source shards, as small thumbnails.

The collection keeps embeddings and hashes, not pixels; the copy check (curation.copies) needs
pixels for the candidate pairs only. Each source shard is read once, by one task, keeping only
the wanted keys as thumbnails (a few KB each), so memory follows the candidates, not the shards.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

import numpy as np

from collection.shards import ShardOpenError, list_shards, read_shard
from curation.copies import thumbnail
from pipelines.decode import decode_image

log = logging.getLogger(__name__)

#: decoded pictures over this many pixels are refused from their header (the embed job's limit)
MAX_PIXELS = 178_956_970


def shard_thumbnails(shard_url: str, wanted: dict[str, int]) -> dict[int, np.ndarray]:
    """{global id: thumbnail} of the `wanted` keys ({key: id}) found in one source shard.

    A shard that cannot be opened raises ShardOpenError naming it; a wanted key whose image
    is missing or undecodable is simply absent from the result (the caller counts them).
    """
    shards = list_shards(shard_url)
    if not shards:
        raise ShardOpenError(f"{shard_url}: source shard not found")
    out: dict[int, np.ndarray] = {}
    for raw in read_shard(shards[0]):
        gid = wanted.get(raw.key)
        if gid is None or raw.image is None:
            continue
        image, _, _ = decode_image(raw.image, MAX_PIXELS)
        if image is not None:
            out[gid] = thumbnail(image)
    return out


def load_thumbnails(
    keys: np.ndarray,
    shards: np.ndarray,
    ids: Iterable[int],
    run: Callable[[Callable[..., Any], list[tuple]], list[Any]],
) -> dict[int, np.ndarray]:
    """Thumbnails of the samples `ids` (global ids into `keys` / `shards`), one task per source shard.

    `run(fn, argument tuples)` runs the tasks (in this process or on a Dask cluster).
    """
    by_shard: dict[str, dict[str, int]] = {}
    for gid in sorted(set(int(i) for i in ids)):
        by_shard.setdefault(str(shards[gid]), {})[str(keys[gid])] = gid
    out: dict[int, np.ndarray] = {}
    for part in run(shard_thumbnails, sorted(by_shard.items())):
        out.update(part)
    missing = sum(len(v) for v in by_shard.values()) - len(out)
    if missing:
        log.warning(
            "%d of %d pictures could not be re-read from their source shards; their pairs are not "
            "checked",
            missing,
            missing + len(out),
        )
    return out
