"""Reading samples' images back from their source shards: the one implementation of that rule.

A collection keeps no pixels: each metadata row names its `source_shard` and, for plain tars,
where its image member's bytes sit there (`source_offset`, `source_size`, recorded at embed
time). `read_images` groups rows by shard, reads each shard's members by byte range with one
`cat_ranges` call (concurrent requests on object stores, neighbours merged only where the gap
costs little), and checks each against the row's `sha256`. Rows without a range, whose bytes
fail the check, or whose shard is parquet, a files folder or a compressed tar are found by
scanning the shard (`collection.shards.read_shard`) and checked the same way. A row that cannot
be found comes back with a reason; nothing raises for the whole batch, so each caller decides
(export fails a shard whose source is gone, the web UI shows a blank tile).

The bytes fetched from the source shards are counted, so an export can say how close its reads
came to the bytes it needed (a scan counts its whole shard: it may read all of it).
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import pyarrow as pa

from collection import schema as S
from collection.shards import WEBDATASET, Shard, ShardOpenError, format_of, read_shard
from collection.storage import REMOTE_ERRORS, url_to_fs

log = logging.getLogger(__name__)

#: the columns a row needs (`key` and `source_shard` at least; the others may be missing or null)
COLUMNS = (S.SOURCE_SHARD, S.KEY, S.SOURCE_OFFSET, S.SOURCE_SIZE, S.SHA256)
#: two members are read as one request only when the bytes between them are at most this many
MERGE_GAP = 64 << 10
#: and at most this share of the member that joins the request, so merged reads fetch at most
#: 1 + GAP_SHARE times the members' bytes (captions and json sit between images in a tar)
GAP_SHARE = 0.1
#: no single request larger than this
MAX_SPAN = 64 << 20

# why a row has no image: the kinds, then a sentence naming the shard and key in `Found.why`
OK = "ok"
NO_SOURCE = "no_source"  #: the row names no source shard or key
GONE = "gone"  #: the source shard no longer exists
UNREADABLE = "unreadable"  #: the source shard exists but cannot be read
NOT_FOUND = "not_found"  #: the shard no longer holds the row's key (or its image member)
CHANGED = "changed"  #: the bytes found differ from the embedded ones (sha256)
#: kinds that concern the whole shard rather than the row
SHARD_KINDS = (GONE, UNREADABLE)


@dataclass(frozen=True)
class Found:
    """One row's image bytes (`data`), or why there are none (`kind`, and `why` in words)."""

    data: bytes | None
    kind: str = OK
    why: str = ""


@dataclass
class ImageBatch:
    """`read_images`' answer: one `Found` per row, in order, and what it cost."""

    found: list[Found] = field(default_factory=list)
    #: bytes read from the source shards: range reads as fetched, scans as their shards' size
    bytes_fetched: int = 0
    #: bytes of the image members found (what the rows needed)
    member_bytes: int = 0
    #: rows found by byte range, rows found by scanning, shards scanned
    ranged: int = 0
    scanned: int = 0
    shards_scanned: int = 0

    @property
    def images(self) -> list[bytes | None]:
        return [f.data for f in self.found]


def rows_of(table: pa.Table) -> list[dict[str, Any]]:
    """The `COLUMNS` of a metadata table as row dicts (columns it lacks read as null)."""
    cols = {c: table[c].to_pylist() for c in COLUMNS if c in table.column_names}
    return [{c: cols[c][i] if c in cols else None for c in COLUMNS} for i in range(len(table))]


def matches(data: bytes, digest: str | None) -> bool:
    """Whether `data` hashes to the recorded sha256 (any case); rows without one always match."""
    return not digest or hashlib.sha256(data).hexdigest() == digest.strip().lower()


def spans(
    offsets: Sequence[int],
    sizes: Sequence[int],
    merge_gap: int = MERGE_GAP,
    gap_share: float = GAP_SHARE,
) -> list[tuple[int, int, list[int]]]:
    """(start, end, member positions) per request: members by offset, a member joining the
    request before it only when the gap is at most `merge_gap` and `gap_share` of its size."""
    order = sorted(range(len(offsets)), key=lambda i: offsets[i])
    out: list[list[Any]] = []
    for i in order:
        start, end = offsets[i], offsets[i] + sizes[i]
        if out:
            gap = start - out[-1][1]
            if gap <= min(merge_gap, gap_share * sizes[i]) and end - out[-1][0] <= MAX_SPAN:
                out[-1][1] = max(out[-1][1], end)
                out[-1][2].append(i)
                continue
        out.append([start, end, [i]])
    return [(s, e, members) for s, e, members in out]


def _by_range(
    url: str, rows: Sequence[Mapping[str, Any]], idx: list[int], batch: ImageBatch
) -> tuple[dict[int, bytes], bool]:
    """Bytes of the rows at `idx` read by their recorded ranges, those that pass the sha256
    check; and whether the shard was found missing (then there is nothing to scan)."""
    starts = [int(rows[i][S.SOURCE_OFFSET]) for i in idx]
    sizes = [int(rows[i][S.SOURCE_SIZE]) for i in idx]
    plan = spans(starts, sizes)
    try:
        fs, path = url_to_fs(url)
        blobs = fs.cat_ranges(
            [path] * len(plan), [s for s, _, _ in plan], [e for _, e, _ in plan], on_error="return"
        )
    except FileNotFoundError:
        return {}, True
    except REMOTE_ERRORS as exc:  # the scan that follows names the problem
        log.debug("%s: range reads failed (%s); scanning instead", url, exc)
        return {}, False
    out: dict[int, bytes] = {}
    gone = False
    for (start, _, members), blob in zip(plan, blobs):
        if not isinstance(blob, bytes):
            gone = gone or isinstance(blob, FileNotFoundError)
            continue
        batch.bytes_fetched += len(blob)
        view = memoryview(blob)
        for j in members:
            i = idx[j]
            data = bytes(view[starts[j] - start : starts[j] - start + sizes[j]])
            if len(data) == sizes[j] and matches(data, rows[i].get(S.SHA256)):
                out[i] = data
    return out, gone


def _shard_size(fs: Any, path: str, is_dir: bool) -> int:
    """Bytes a scan of the shard may read: the file's size, or a files folder's total."""
    try:
        return int(fs.du(path, total=True) if is_dir else fs.size(path) or 0)
    except REMOTE_ERRORS:
        return 0


def _scan(url: str, keys: set[str]) -> tuple[dict[str, bytes], str, str, int]:
    """Image bytes of `keys` found by reading their source shard: (found, kind and sentence for
    the keys not found, bytes the scan may have read)."""
    try:
        fs, path = url_to_fs(url)
        exists = fs.exists(path)
        is_dir = exists and fs.isdir(path)
    except REMOTE_ERRORS as exc:  # an fsspec protocol not installed, an unreachable store
        return {}, UNREADABLE, f"source shard {url} cannot be opened: {exc}", 0
    if not exists:
        return {}, GONE, f"source shard {url} is gone", 0
    size = _shard_size(fs, path, is_dir)
    found: dict[str, bytes] = {}
    try:
        for raw in read_shard(Shard(url, format_of(url, is_dir) or WEBDATASET)):
            if raw.key in keys and raw.image is not None:
                found[raw.key] = raw.image
                if len(found) == len(keys):
                    break
    except (ShardOpenError, OSError) as exc:
        return found, UNREADABLE, f"source shard {url} is unreadable: {exc}", size
    return found, NOT_FOUND, f"no longer in source shard {url}", size


def read_images(rows: Sequence[Mapping[str, Any]] | pa.Table) -> ImageBatch:
    """Each row's image bytes from its source shard, checked against its sha256 (see the module
    doc); rows are dicts with `COLUMNS` (or a metadata table). Never raises for a row."""
    if isinstance(rows, pa.Table):
        rows = rows_of(rows)
    batch = ImageBatch(
        found=[Found(None, NO_SOURCE, "no source shard or key recorded")] * len(rows)
    )
    by_shard: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        if row.get(S.SOURCE_SHARD) and row.get(S.KEY) is not None:
            by_shard[str(row[S.SOURCE_SHARD])].append(i)
    for url, idx in by_shard.items():
        ranged = [
            i
            for i in idx
            if rows[i].get(S.SOURCE_OFFSET) is not None
            and rows[i].get(S.SOURCE_SIZE) is not None
            and format_of(url) == WEBDATASET
        ]
        data, gone = _by_range(url, rows, ranged, batch) if ranged else ({}, False)
        for i, blob in data.items():
            batch.found[i] = Found(blob)
        batch.ranged += len(data)
        rest = [i for i in idx if i not in data]
        if not rest:
            continue
        if gone:
            why = f"source shard {url} is gone"
            for i in rest:
                batch.found[i] = Found(None, GONE, why)
            continue
        found, kind, why, size = _scan(url, {str(rows[i][S.KEY]) for i in rest})
        batch.bytes_fetched += size
        batch.shards_scanned += 1
        for i in rest:
            key = str(rows[i][S.KEY])
            blob = found.get(key)
            if blob is None:
                batch.found[i] = Found(None, kind, f"key {key!r}: {why}")
            elif not matches(blob, rows[i].get(S.SHA256)):
                batch.found[i] = Found(
                    None,
                    CHANGED,
                    f"key {key!r}: its image in {url} differs from the one embedded (sha256); "
                    "the source shard changed since embedding",
                )
            else:
                batch.found[i] = Found(blob)
                batch.scanned += 1
    batch.member_bytes = sum(len(f.data) for f in batch.found if f.data is not None)
    return batch
