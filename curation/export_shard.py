"""One output shard of an export: the Dask task behind `python -m curation.export`.

A task gets its rows (metadata plus global id, in export order), re-checks them against the
takedown list as it is now, reads each image back from its source shard, reads the rows'
embeddings, and writes the shard under a temporary name renamed into place, then its
`_stats.json` (img2dataset's completion mark). Its output depends only on its rows and the
options, so a rerun writes the same bytes.

Images are read by byte range: at embed time `collection.shards` records where each image
member's data sits in its tar (`source_offset`, `source_size`), so a task reads those ranges,
neighbours merged into one request, and never the rest of the tar. Rows without offsets
(parquet or files sources, compressed tars, collections embedded before offsets existed)
are found by reading their source shard through `collection.shards`. Bytes are checked
against the `sha256` recorded at embed time: a shard rewritten since is an error, not a
silent swap of images.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from collection import schema as S
from collection.shards import Shard, ShardOpenError, format_of, read_shard
from collection.storage import url_to_fs, write_json
from collection.takedown import Takedown
from curation.shard_writer import json_lines, write_parquet, write_webdataset

#: neighbouring byte ranges closer than this are read as one request (the members between
#: them, caption and json, are small next to a request's cost on object stores)
MERGE_GAP = 1 << 20
#: but no single request larger than this
MAX_SPAN = 64 << 20
#: JPEG quality of re-encoded images (resized, or not JPEG at the source)
JPEG_QUALITY = 95
#: metadata columns that locate a row inside the collection or its source, not describe the sample
INTERNAL_COLUMNS = (
    S.PART,
    S.ROW,
    S.EMB_ROW,
    S.SOURCE_SHARD,
    S.SOURCE_OFFSET,
    S.SOURCE_SIZE,
    S.STATUS,
    S.ERROR,
)


class ExportError(RuntimeError):
    """An export cannot go on; the one-line message names the shard, file or key."""


@dataclass(frozen=True)
class ExportOptions:
    """What every task of one export shares; `identity()` is what makes a written shard reusable."""

    collection: str
    out: str
    format: str = S.EXPORT_WEBDATASET
    image_size: int | None = None
    resize: str = "none"
    spec_hash: str = ""
    embeddings: tuple[str, ...] = S.MODALITIES
    #: complete parts and the global id each starts at (plus the total): where a task finds a
    #: row's vectors without opening every part of a large collection
    parts: tuple[int, ...] = ()
    offsets: tuple[int, ...] = (0,)

    def identity(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "image_size": self.image_size,
            "resize": self.resize,
            "spec_hash": self.spec_hash,
            "embeddings": list(self.embeddings),
        }


def json_columns(names: list[str]) -> list[str]:
    """The fields of each exported sample's json (and parquet row), in order."""
    return [n for n in names if n not in INTERNAL_COLUMNS]


# ---- reading images back -------------------------------------------------------------------
def _spans(offsets: list[int], sizes: list[int]) -> list[tuple[int, int, list[int]]]:
    """(start, end, member positions) per request: members sorted by offset, neighbours merged."""
    order = sorted(range(len(offsets)), key=lambda i: offsets[i])
    spans: list[list[Any]] = []
    for i in order:
        start, end = offsets[i], offsets[i] + sizes[i]
        if spans and start - spans[-1][1] <= MERGE_GAP and end - spans[-1][0] <= MAX_SPAN:
            spans[-1][1] = max(spans[-1][1], end)
            spans[-1][2].append(i)
        else:
            spans.append([start, end, [i]])
    return [(s, e, members) for s, e, members in spans]


def _read_ranges(url: str, offsets: list[int], sizes: list[int], shard: int) -> list[bytes]:
    """The given byte ranges of one source file (fsspec `cat_ranges`: concurrent on object stores)."""
    fs, path = url_to_fs(url)
    spans = _spans(offsets, sizes)
    try:
        blobs = fs.cat_ranges(
            [path] * len(spans),
            [s for s, _, _ in spans],
            [e for _, e, _ in spans],
            on_error="raise",
        )
    except FileNotFoundError:
        raise ExportError(
            f"{url}: source shard has vanished since embedding (output shard {shard:05d} needs "
            f"{len(offsets)} images from it)"
        ) from None
    except OSError as exc:
        raise ExportError(
            f"{url}: cannot read the source shard ({type(exc).__name__}: {exc})"
        ) from None
    out: list[bytes] = [b""] * len(offsets)
    for (start, end, members), blob in zip(spans, blobs):
        if len(blob) < end - start:
            raise ExportError(
                f"{url}: source shard is shorter than when it was embedded "
                f"(needed bytes {start}-{end}, got {len(blob)})"
            )
        view = memoryview(blob)
        for i in members:
            out[i] = bytes(view[offsets[i] - start : offsets[i] - start + sizes[i]])
    return out


def _scan(url: str, keys: list[str], shard: int) -> list[bytes]:
    """Images of `keys` found by reading their whole source shard (no offsets recorded)."""
    fs, path = url_to_fs(url)
    try:
        is_dir = fs.isdir(path)
    except OSError:
        is_dir = False
    fmt = format_of(url, is_dir) or S.EXPORT_WEBDATASET
    wanted = set(keys)
    found: dict[str, bytes] = {}
    try:
        for raw in read_shard(Shard(url, fmt)):
            if raw.key in wanted and raw.image is not None:
                found[raw.key] = raw.image
                if len(found) == len(wanted):
                    break
    except ShardOpenError as exc:
        if not fs.exists(path):
            raise ExportError(
                f"{url}: source shard has vanished since embedding (output shard {shard:05d} needs "
                f"{len(keys)} images from it)"
            ) from None
        raise ExportError(f"{url}: cannot read the source shard ({exc})") from None
    missing = [k for k in keys if k not in found]
    if missing:
        raise ExportError(f"{url}: key {missing[0]!r} is no longer in this source shard")
    return [found[k] for k in keys]


def read_images(rows: pa.Table, shard: int) -> list[bytes]:
    """Each row's image bytes from its source shard, checked against the recorded sha256."""
    urls = rows[S.SOURCE_SHARD].to_pylist()
    keys = rows[S.KEY].to_pylist()
    cols = rows.column_names
    offsets = rows[S.SOURCE_OFFSET].to_pylist() if S.SOURCE_OFFSET in cols else [None] * len(rows)
    sizes = rows[S.SOURCE_SIZE].to_pylist() if S.SOURCE_SIZE in cols else [None] * len(rows)
    by_url: dict[str, list[int]] = defaultdict(list)
    for i, url in enumerate(urls):
        by_url[url].append(i)
    out: list[bytes] = [b""] * len(rows)
    for url, members in by_url.items():
        ranged = [i for i in members if offsets[i] is not None and sizes[i] is not None]
        scanned = [i for i in members if offsets[i] is None or sizes[i] is None]
        if ranged:
            for i, data in zip(
                ranged,
                _read_ranges(url, [offsets[i] for i in ranged], [sizes[i] for i in ranged], shard),
            ):
                out[i] = data
        if scanned:
            for i, data in zip(scanned, _scan(url, [keys[i] for i in scanned], shard)):
                out[i] = data
    for key, data, digest, url in zip(keys, out, rows[S.SHA256].to_pylist(), urls):
        if digest and hashlib.sha256(data).hexdigest() != digest:
            raise ExportError(
                f"{url}: the image of key {key!r} differs from the one embedded (sha256); "
                f"the source shard changed since embedding"
            )
    return out


# ---- images out --------------------------------------------------------------------------------
def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def transform(
    data: bytes, size: int | None, mode: str, key: str
) -> tuple[bytes, int | None, int | None]:
    """(JPEG bytes, width, height) of one image as the export writes it.

    `none` keeps JPEG bytes as they are (width/height None: unchanged); other formats are
    re-encoded as JPEG. `center_crop` scales the short side to `size` and crops the centre
    square; `keep_ratio` scales the short side to `size` (img2dataset's modes).
    """
    if mode == "none" and data[:2] == b"\xff\xd8":
        return data, None, None
    try:
        img = Image.open(io.BytesIO(data))
        img = img.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:
        raise ExportError(f"key {key!r}: the source image no longer decodes ({exc})") from None
    if mode != "none" and size:
        w, h = img.size
        scale = size / min(w, h)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
        if mode == "center_crop":
            w, h = img.size
            left, top = (w - size) // 2, (h - size) // 2
            img = img.crop((left, top, left + size, top + size))
    return _jpeg(img), img.size[0], img.size[1]


# ---- writing ---------------------------------------------------------------------------------
def export_table(
    rows: pa.Table, columns: list[str], dims: list[tuple[int | None, int | None]]
) -> pa.Table:
    """The exported fields of each row (its json, or its parquet row): our columns, the written
    image's width/height, and the source's as original_width/original_height (img2dataset's names)."""
    table = rows.select(columns)
    originals = {"original_width": rows[S.WIDTH], "original_height": rows[S.HEIGHT]}
    for axis, name in enumerate((S.WIDTH, S.HEIGHT)):
        if any(d[axis] is not None for d in dims) and name in columns:
            fresh = pa.array([d[axis] for d in dims], pa.int32())
            table = table.set_column(
                columns.index(name), name, pc.coalesce(fresh, rows[name].cast(pa.int32()))
            )
    for name, values in originals.items():  # a source may carry these columns already: ours win
        values = values.cast(pa.int32())
        table = (
            table.set_column(table.column_names.index(name), name, values)
            if name in table.column_names
            else table.append_column(name, values)
        )
    return table


def _embeddings(opts: ExportOptions, ids: np.ndarray) -> dict[str, np.ndarray]:
    """The rows' stored embeddings per modality, float16 as stored, from the parts they live in."""
    layout = S.CollectionLayout(opts.collection)
    offsets = np.asarray(opts.offsets, dtype=np.int64)
    which = np.searchsorted(offsets, ids, side="right") - 1
    out = {}
    for modality in opts.embeddings:
        vectors: np.ndarray | None = None
        for p in np.unique(which):
            path = layout.emb(modality, opts.parts[p])
            try:
                part = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise ExportError(
                    f"{path}: cannot read the {modality} embeddings ({exc})"
                ) from None
            if vectors is None:
                vectors = np.empty((len(ids), part.shape[1]), dtype=S.EMB_DTYPE)
            sel = np.nonzero(which == p)[0]
            vectors[sel] = part[ids[sel] - offsets[p]]
        out[modality] = vectors if vectors is not None else np.zeros((0, 0), S.EMB_DTYPE)
    return out


def write_shard(index: int, rows: pa.Table, identity: str, opts: ExportOptions) -> dict[str, Any]:
    """Write output shard `index` from `rows` (metadata + id, in order); returns its stats.

    The takedown list is read again here, so a row listed since the spec was resolved is
    left out. The stats file is written last: its presence (with this `identity`) means done.
    """
    start = time.time()
    blocked = np.asarray(Takedown.load(opts.collection).blocked_mask(rows), dtype=bool)
    if blocked.any():
        rows = rows.filter(pa.array(~blocked))
    keys = rows[S.KEY].to_pylist()
    captions = rows[S.CAPTION].to_pylist()
    columns = json_columns(rows.column_names)
    images: list[bytes] | None = None
    dims: list[tuple[int | None, int | None]] = [(None, None)] * len(rows)
    read_s = 0.0
    if opts.format != S.EXPORT_URLS:
        t_read = time.time()
        images = read_images(rows, index)
        read_s = time.time() - t_read
        made = [
            transform(data, opts.image_size, opts.resize, key) for data, key in zip(images, keys)
        ]
        images = [m[0] for m in made]
        dims = [(m[1], m[2]) for m in made]
    embs = _embeddings(opts, rows[S.ID].to_numpy()) if opts.format != S.EXPORT_URLS else {}
    table = export_table(rows, columns, dims)
    if opts.format == S.EXPORT_WEBDATASET:
        path = f"{opts.out.rstrip('/')}/{S.shard_name(index)}"
        written = write_webdataset(path, keys, images or [], captions, json_lines(table), embs)
    else:
        path = f"{opts.out.rstrip('/')}/{S.shard_name(index, 'parquet')}"
        written = write_parquet(path, table, images, embs)
    end = time.time()
    stats = {
        "shard": index,
        "count": len(rows),
        "successes": len(rows),
        "failed_to_download": 0,
        "status_dict": {"success": len(rows)},
        "taken_down": int(blocked.sum()),
        "identity": identity,
        "spec_hash": opts.spec_hash,
        "format": opts.format,
        "bytes": written,
        "start_time": start,
        "end_time": end,
        "duration": end - start,
        "read_s": read_s,
    }
    write_json(f"{opts.out.rstrip('/')}/{S.stats_name(index)}", stats)
    return stats
