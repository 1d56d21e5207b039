"""The copies level's verdict tasks: each reads its candidate pairs' pictures back from the
source shards and applies the copy rule (curation.copies).

The collection keeps embeddings and hashes, not pixels. One task per group of candidate pairs
reads the pictures it needs through `collection.images` (by byte range where the rows carry
one, else by scanning the shard; checked against their sha256; on a local disk or an object
store), keeps them as small thumbnails for the task's life, writes its verdicts as parquet and
returns counts: no picture passes through the driver.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from collection.images import SHARD_KINDS, read_images
from collection.shards import ShardOpenError
from collection.storage import url_to_fs
from curation.copies import is_copy, thumbnail
from curation.copy_candidates import LOCATION, pair_file, verdict_file
from curation.copy_sketch import local_hashes
from curation.vectors import write_table
from pipelines.decode import decode_image

log = logging.getLogger(__name__)

#: decoded pictures over this many pixels are refused from their header (the embed job's limit)
MAX_PIXELS = 178_956_970


def thumbnails(rows: list[dict[str, Any]]) -> list[np.ndarray | None]:
    """The thumbnail of each row's picture (`collection.images.COLUMNS`), None where it could not
    be read back, had changed or does not decode. A source shard that is gone or unreadable
    raises ShardOpenError naming it."""
    batch = read_images(rows)
    for found in batch.found:
        if found.kind in SHARD_KINDS:
            raise ShardOpenError(found.why)
    out: list[np.ndarray | None] = []
    for found in batch.found:
        image = decode_image(found.data, MAX_PIXELS)[0] if found.data is not None else None
        out.append(thumbnail(image) if image is not None else None)
    return out


def check_pairs(work: str, task: int) -> dict[str, int]:
    """One verdict task: the pairs of `pairs-{task}.parquet` checked by the copy rule, written to
    `verdict-{task}.parquet` (i, j, copy); pairs whose pictures could not be read back are not
    copies. Returns counts only."""
    fs, path = url_to_fs(pair_file(work, task))
    with fs.open(path, "rb") as fh:
        pairs = pq.read_table(fh)
    i = pairs.column("i").to_numpy()
    j = pairs.column("j").to_numpy()
    ids, first = np.unique(np.concatenate([i, j]), return_index=True)
    sides = {
        c: np.concatenate(
            [
                pairs.column(f"a_{c}").to_numpy(zero_copy_only=False),
                pairs.column(f"b_{c}").to_numpy(zero_copy_only=False),
            ]
        )[first]
        for c in LOCATION
    }
    rows = [{c: _plain(sides[c][n]) for c in LOCATION} for n in range(len(ids))]
    thumbs = thumbnails(rows)
    at = {int(g): t for g, t in zip(ids, thumbs)}
    verdict = np.zeros(len(i), bool)
    for n, (a, b) in enumerate(zip(i, j)):
        ta, tb = at[int(a)], at[int(b)]
        verdict[n] = ta is not None and tb is not None and is_copy(ta, tb)
    write_table(verdict_file(work, task), pa.table({"i": i, "j": j, "copy": verdict}))
    return {
        "pairs": len(i),
        "copies": int(verdict.sum()),
        "pictures": len(ids),
        "unread": sum(t is None for t in thumbs),
    }


def sketch_rows(rows_path: str, out: str, lo: int, hi: int) -> dict[str, int]:
    """One sketch task: the local hashes (`curation.copy_sketch`) of the alive rows lo..hi-1 of
    the work's rows table, read from their pictures, written to `out` as (id, h). Returns
    counts only."""
    fs, path = url_to_fs(rows_path)
    with fs.open(path, "rb") as fh:
        table = pq.read_table(fh, columns=["id", "alive", *LOCATION]).slice(lo, hi - lo)
    table = table.filter(table.column("alive"))
    ids = table.column("id").to_numpy()
    cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in LOCATION}
    thumbs = thumbnails([{c: _plain(cols[c][n]) for c in LOCATION} for n in range(len(ids))])
    found = [(g, local_hashes(t)) for g, t in zip(ids, thumbs) if t is not None]
    sid = np.concatenate([np.full(len(h), g, np.int64) for g, h in found] or [np.zeros(0, int)])
    hashes = np.concatenate([h for _, h in found] or [np.zeros(0, np.int64)])
    write_table(out, pa.table({"id": sid.astype(np.int64), "h": hashes.astype(np.int64)}))
    return {"pictures": len(ids), "hashes": len(hashes), "unread": len(ids) - len(found)}


def _plain(value: Any) -> Any:
    """A numpy cell as a plain value, None where unknown (null / NaN)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return value.item() if hasattr(value, "item") else value
