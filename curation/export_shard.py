"""One output shard of an export: the Dask task behind `python -m curation.export`.

A task gets its rows (metadata plus global id, in export order), re-checks them against the
takedown list as it is now, reads each image back from its source shard, reads the rows'
embeddings, and writes the shard under a temporary name renamed into place, then its
`_stats.json` (img2dataset's completion mark). Its output depends only on its rows and the
options, so a rerun writes the same bytes.

Images are read by byte range: at embed time `pipelines.readers` records where each image
member's data sits in its tar (`source_offset`, `source_size`), so a task reads those ranges,
neighbours merged into one request, and never the rest of the tar. Rows without offsets
(parquet or files sources, compressed tars, collections embedded before offsets existed)
are found by reading their source shard through `pipelines.readers`. Bytes are checked
against the `sha256` recorded at embed time: a shard rewritten since is an error, not a
silent swap of images.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from curation import schema as S
from curation import takedown
from curation.storage import atomic_open, url_to_fs, write_json
from indices.store import CollectionError, EmbeddingStore
from pipelines.readers import Shard, ShardOpenError, format_of, read_shard
from pipelines.writer import npy_bytes

#: neighbouring byte ranges closer than this are read as one request (the members between
#: them, caption and json, are small next to a request's cost on object stores)
MERGE_GAP = 1 << 20
#: but no single request larger than this
MAX_SPAN = 64 << 20
#: JPEG quality of re-encoded images (resized, or not JPEG at the source)
JPEG_QUALITY = 95
#: tar member times: fixed, so a rerun writes byte-identical shards
MTIME = 1_700_000_000
#: metadata columns that locate a row inside the collection or its source, not describe the sample
INTERNAL_COLUMNS = (S.PART, S.ROW, S.EMB_ROW, S.SOURCE_SHARD, S.SOURCE_OFFSET, S.SOURCE_SIZE, S.STATUS, S.ERROR)


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

    def identity(self) -> dict[str, Any]:
        return {"format": self.format, "image_size": self.image_size, "resize": self.resize,
                "spec_hash": self.spec_hash, "embeddings": list(self.embeddings)}


def json_columns(names: list[str]) -> list[str]:
    """The fields of each exported sample's json (and parquet row), in order."""
    return [n for n in names if n not in INTERNAL_COLUMNS]


# ---- reading images back -------------------------------------------------------------------
def _spans(offsets: list[int], sizes: list[int]) -> list[tuple[int, int, list[int]]]:
    """(start, end, member positions) per request: members sorted by offset, neighbours merged."""
    order = sorted(range(len(offsets)), key=lambda i: offsets[i])
    spans: list[tuple[int, int, list[int]]] = []
    for i in order:
        start, end = offsets[i], offsets[i] + sizes[i]
        if spans and start - spans[-1][1] <= MERGE_GAP and end - spans[-1][0] <= MAX_SPAN:
            s, e, members = spans[-1]
            spans[-1] = (s, max(e, end), members + [i])
        else:
            spans.append((start, end, [i]))
    return spans


def _read_ranges(url: str, offsets: list[int], sizes: list[int], shard: int) -> list[bytes]:
    """The given byte ranges of one source file (fsspec `cat_ranges`: concurrent on object stores)."""
    fs, path = url_to_fs(url)
    spans = _spans(offsets, sizes)
    try:
        blobs = fs.cat_ranges([path] * len(spans), [s for s, _, _ in spans], [e for _, e, _ in spans],
                              on_error="raise")
    except FileNotFoundError:
        raise ExportError(f"{url}: source shard has vanished since embedding (output shard {shard:05d} needs "
                          f"{len(offsets)} images from it)") from None
    except OSError as exc:
        raise ExportError(f"{url}: cannot read the source shard ({type(exc).__name__}: {exc})") from None
    out: list[bytes] = [b""] * len(offsets)
    for (start, end, members), blob in zip(spans, blobs):
        if len(blob) < end - start:
            raise ExportError(f"{url}: source shard is shorter than when it was embedded "
                              f"(needed bytes {start}-{end}, got {len(blob)})")
        view = memoryview(blob)
        for i in members:
            out[i] = bytes(view[offsets[i] - start:offsets[i] - start + sizes[i]])
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
            raise ExportError(f"{url}: source shard has vanished since embedding (output shard {shard:05d} needs "
                              f"{len(keys)} images from it)") from None
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
            for i, data in zip(ranged, _read_ranges(url, [offsets[i] for i in ranged],
                                                    [sizes[i] for i in ranged], shard)):
                out[i] = data
        if scanned:
            for i, data in zip(scanned, _scan(url, [keys[i] for i in scanned], shard)):
                out[i] = data
    for key, data, digest, url in zip(keys, out, rows[S.SHA256].to_pylist(), urls):
        if digest and hashlib.sha256(data).hexdigest() != digest:
            raise ExportError(f"{url}: the image of key {key!r} differs from the one embedded (sha256); "
                              f"the source shard changed since embedding")
    return out


# ---- images out --------------------------------------------------------------------------------
def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def transform(data: bytes, size: int | None, mode: str, key: str) -> tuple[bytes, int | None, int | None]:
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
def tar_header(name: str, size: int) -> bytes:
    """A ustar header (mode 644, fixed time, no owner): built directly, a tarfile.TarInfo per
    member being much of a shard's writing time; long names go through tarfile's pax form."""
    raw = name.encode("utf-8")
    if len(raw) > 100:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, MTIME, 0o644
        return info.tobuf(format=tarfile.PAX_FORMAT)
    block = bytearray(512)
    block[0:len(raw)] = raw
    block[100:108] = b"0000644\0"
    block[108:116] = b"0000000\0"
    block[116:124] = b"0000000\0"
    block[124:136] = b"%011o\0" % size
    block[136:148] = b"%011o\0" % MTIME
    block[148:156] = b"        "
    block[156:157] = b"0"
    block[257:265] = b"ustar\x0000"
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


class TarWriter:
    """Members appended to a binary stream in webdataset's layout, written a few MiB at a time
    (one file write per member was most of the cost for small members); `close` ends the tar."""

    FLUSH = 4 << 20

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.buf = bytearray()
        self.bytes = 0

    def add(self, name: str, data: bytes) -> None:
        buf = self.buf
        buf += tar_header(name, len(data))
        buf += data
        pad = -len(data) % 512
        if pad:
            buf += b"\0" * pad
        if len(buf) >= self.FLUSH:
            self._flush()

    def _flush(self) -> None:
        self.fh.write(self.buf)
        self.bytes += len(self.buf)
        self.buf = bytearray()

    def close(self) -> None:
        self.buf += b"\0" * 1024
        self._flush()


class NpyWriter:
    """`.npy` bytes of equal-shaped vectors: the header made once (np.save formats it per call)."""

    def __init__(self, dim: int, dtype: str = S.EMB_DTYPE) -> None:
        empty = np.zeros(dim, dtype=dtype)
        full = npy_bytes(empty)
        self.header = full[:len(full) - empty.nbytes]
        self.dtype = np.dtype(dtype)

    def __call__(self, vec: np.ndarray) -> bytes:
        return self.header + np.ascontiguousarray(vec, dtype=self.dtype).tobytes()


def _plain(value: Any) -> Any:
    """A JSON-safe value (NaN as null, bytes as text)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _records(rows: pa.Table, columns: list[str], dims: list[tuple[int | None, int | None]]) -> list[dict[str, Any]]:
    """Each row's json: its columns, the written image's size and the source's (img2dataset's names)."""
    data = {c: rows[c].to_pylist() for c in columns}
    out = []
    for i, (w, h) in enumerate(dims):
        rec = {c: _plain(data[c][i]) for c in columns}
        ow, oh = rec.get(S.WIDTH), rec.get(S.HEIGHT)
        if w is not None:
            rec[S.WIDTH], rec[S.HEIGHT] = w, h
        rec["original_width"], rec["original_height"] = ow, oh
        out.append(rec)
    return out


def _embeddings(opts: ExportOptions, ids: np.ndarray) -> dict[str, np.ndarray]:
    """The rows' stored embeddings per modality, float16 as stored."""
    out = {}
    for modality in opts.embeddings:
        try:
            store = EmbeddingStore.open(opts.collection, modality)
        except CollectionError as exc:
            raise ExportError(f"{opts.collection}: {exc}") from None
        out[modality] = store.gather(ids).astype(S.EMB_DTYPE)
    return out


def _write_webdataset(path: str, keys: list[str], images: list[bytes], captions: list[str],
                      records: list[dict[str, Any]], embs: dict[str, np.ndarray]) -> int:
    writers = {m: NpyWriter(v.shape[1]) for m, v in embs.items() if v.ndim == 2}
    ext = {S.MODALITY_IMAGE: S.EXPORT_IMG_EMB_EXT, S.MODALITY_TEXT: S.EXPORT_TXT_EMB_EXT}
    with atomic_open(path) as fh:
        tar = TarWriter(fh)
        for i, key in enumerate(keys):
            tar.add(f"{key}.{S.EXPORT_IMAGE_EXT}", images[i])
            tar.add(f"{key}.{S.EXPORT_TEXT_EXT}", (captions[i] or "").encode("utf-8"))
            tar.add(f"{key}.{S.EXPORT_JSON_EXT}", json.dumps(records[i], ensure_ascii=False).encode("utf-8"))
            for modality, vectors in embs.items():
                tar.add(f"{key}.{ext[modality]}", writers[modality](vectors[i]))
        tar.close()
    return tar.bytes


def _write_parquet(path: str, rows: pa.Table, columns: list[str], records: list[dict[str, Any]],
                   images: list[bytes] | None, embs: dict[str, np.ndarray]) -> int:
    """img2dataset's parquet output (image bytes under `jpg`) plus our columns and embeddings;
    `urls` exports (no images) are the url + caption table img2dataset can download again."""
    table = rows.select(columns)
    for name in (S.WIDTH, S.HEIGHT):
        if name in columns:
            table = table.set_column(columns.index(name), name, pa.array([r[name] for r in records], pa.int32()))
    for name in ("original_width", "original_height"):  # img2dataset's columns; a source may have them already
        values = pa.array([r[name] for r in records], pa.int32())
        table = (table.set_column(table.column_names.index(name), name, values) if name in table.column_names
                 else table.append_column(name, values))
    if images is not None:
        table = table.append_column(S.EXPORT_IMAGE_COLUMN, pa.array(images, pa.binary()))
    names = {S.MODALITY_IMAGE: S.EXPORT_IMG_EMB_COLUMN, S.MODALITY_TEXT: S.EXPORT_TXT_EMB_COLUMN}
    for modality, vectors in embs.items():
        flat = pa.array(vectors.astype(np.float32).reshape(-1), pa.float32())
        table = table.append_column(names[modality], pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    with atomic_open(path) as fh:
        fh.write(buf.getvalue())
    return buf.tell()


def write_shard(index: int, rows: pa.Table, identity: str, opts: ExportOptions) -> dict[str, Any]:
    """Write output shard `index` from `rows` (metadata + id, in order); returns its stats.

    The takedown list is read again here, so a row listed since the spec was resolved is
    left out. The stats file is written last: its presence (with this `identity`) means done.
    """
    start = time.time()
    blocked = np.asarray(takedown.load(opts.collection).blocked_mask(rows), dtype=bool)
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
        made = [transform(data, opts.image_size, opts.resize, key) for data, key in zip(images, keys)]
        images = [m[0] for m in made]
        dims = [(m[1], m[2]) for m in made]
    embs = _embeddings(opts, rows[S.ID].to_numpy()) if opts.format != S.EXPORT_URLS else {}
    records = _records(rows, columns, dims)
    if opts.format == S.EXPORT_WEBDATASET:
        path = f"{opts.out.rstrip('/')}/{S.shard_name(index)}"
        written = _write_webdataset(path, keys, images or [], captions, records, embs)
    else:
        path = f"{opts.out.rstrip('/')}/{S.shard_name(index, 'parquet')}"
        written = _write_parquet(path, rows, columns, records, images, embs)
    end = time.time()
    stats = {
        "shard": index, "count": len(rows), "successes": len(rows), "failed_to_download": 0,
        "status_dict": {"success": len(rows)}, "taken_down": int(blocked.sum()),
        "identity": identity, "spec_hash": opts.spec_hash, "format": opts.format, "bytes": written,
        "start_time": start, "end_time": end, "duration": end - start, "read_s": read_s,
    }
    write_json(f"{opts.out.rstrip('/')}/{S.stats_name(index)}", stats)
    return stats
