"""One output shard of an export: the Dask task behind `python -m curation.export`.

A task gets its rows' global ids (in export order) and reads their metadata itself from the
parts holding them, so the driver never holds the exported rows; it re-checks them against the
takedown list as it is now, reads each image back from its source shard, reads the rows'
embeddings, and writes the shard under a temporary name renamed into place, then its
`_stats.json` (img2dataset's completion mark). Its output depends only on its rows and the
options, so a rerun writes the same bytes.

Images come back through `collection.images`: by the byte range the embed job recorded (one
`cat_ranges` per source shard, on a local disk or an object store), else by scanning the source
shard, and checked against the `sha256` recorded at embed time. A source shard that is gone or
unreadable fails the task (a rerun continues once it is back); a row whose image is no longer
there as embedded (a member rewritten, a key removed) is left out of the shard and listed with
its reason in `_stats.json`, never exported as a silent swap of images. The stats also count the
bytes fetched from the source shards and the bytes of the members exported.
"""

from __future__ import annotations

import io
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from collection import schema as S
from collection.embeddings import open_npy
from collection.images import GONE, UNREADABLE, ImageBatch, read_images
from collection.parts import CollectionError, by_part, read_part_metadata
from collection.sandbox import one_line
from collection.storage import url_to_fs, write_json
from collection.takedown import Takedown
from curation.export_formats import json_lines, write_parquet, write_webdataset

log = logging.getLogger(__name__)

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
    #: every shard's rows take this schema (the parts' schemas unified, plus `id`), so a shard's
    #: columns do not depend on which parts its rows come from
    schema: pa.Schema | None = None

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


# ---- reading rows ----------------------------------------------------------------------------
def rows_schema(collection: str, parts: list[int]) -> pa.Schema:
    """The exported rows' schema: the metadata schemas of `parts` unified in order (as a
    concatenation of their tables would be), plus `id`. Reads parquet footers only."""
    schemas = []
    for n in parts:
        path = S.CollectionLayout(collection).metadata(n)
        fs, local = url_to_fs(path)
        try:
            schemas.append(pq.read_schema(local, filesystem=fs))
        except FileNotFoundError:
            raise ExportError(f"{path}: missing metadata of part {n}") from None
        except (OSError, pa.ArrowInvalid) as exc:
            raise ExportError(f"{path}: unreadable metadata part: {one_line(exc)}") from None
    fields = pa.unify_schemas(schemas, promote_options="default") if schemas else pa.schema([])
    meta = schemas[0].metadata if schemas else None
    return pa.schema([*fields, pa.field(S.ID, pa.int64())], metadata=meta)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with exactly `schema`'s columns, in order (absent ones null)."""
    columns = [
        table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def gather_rows(opts: ExportOptions, ids: np.ndarray) -> pa.Table:
    """Metadata rows (every column, plus `id`) of the given global ids, in the order given.

    Reads only the parts holding those ids; an id's part and row come from the parts' vector
    counts (`opts.offsets`), the rule that defines global ids.
    """
    tables, order = [], []
    for p, sel, local in by_part(np.asarray(opts.offsets, dtype=np.int64), ids):
        try:
            t = read_part_metadata(opts.collection, int(opts.parts[p]), ok_only=True)
        except CollectionError as exc:
            raise ExportError(str(exc)) from None
        t = t.take(pa.array(local))
        tables.append(t.append_column(S.ID, pa.array(ids[sel], pa.int64())))
        order.append(sel)
    if not tables:
        table = pa.table({S.ID: pa.array([], pa.int64())})
    else:
        table = pa.concat_tables(tables, promote_options="default")
        back = np.empty(len(ids), dtype=np.int64)
        back[np.concatenate(order)] = np.arange(len(ids))
        table = table.take(pa.array(back))
    return table if opts.schema is None else conform(table, opts.schema)


# ---- reading images back -------------------------------------------------------------------
def read_source_images(rows: pa.Table, shard: int) -> tuple[list[bytes | None], ImageBatch]:
    """Each row's image from its source shard (`collection.images`), None for a row whose image
    is no longer there as embedded; raises ExportError when a source shard is gone or unreadable
    (a rerun can continue once it is back)."""
    batch = read_images(rows)
    urls = rows[S.SOURCE_SHARD].to_pylist()
    for url, found in zip(urls, batch.found):
        if found.kind == GONE:
            needs = sum(u == url for u in urls)
            raise ExportError(
                f"{url}: source shard has vanished since embedding (output shard {shard:05d} "
                f"needs {needs} images from it)"
            )
        if found.kind == UNREADABLE:
            raise ExportError(f"{url}: cannot read the source shard ({one_line(found.why)})")
    return batch.images, batch


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
    image's width/height, and the source's as original_width/original_height (img2dataset's
    names)."""
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
    """The rows' stored embeddings per modality, float16 as stored, from the parts they live in
    (memory-mapped when local, the rows' byte ranges when remote: `collection.embeddings`)."""
    layout = S.CollectionLayout(opts.collection)
    offsets = np.asarray(opts.offsets, dtype=np.int64)
    which = np.searchsorted(offsets, ids, side="right") - 1
    out = {}
    for modality in opts.embeddings:
        vectors: np.ndarray | None = None
        for p in np.unique(which):
            path = layout.emb(modality, opts.parts[p])
            sel = np.nonzero(which == p)[0]
            try:
                picked = np.asarray(open_npy(path)[ids[sel] - offsets[p]])
            except (OSError, ValueError, CollectionError) as exc:
                raise ExportError(
                    f"{path}: cannot read the {modality} embeddings ({exc})"
                ) from None
            if vectors is None:
                vectors = np.empty((len(ids), picked.shape[1]), dtype=S.EMB_DTYPE)
            vectors[sel] = picked
        out[modality] = vectors if vectors is not None else np.zeros((0, 0), S.EMB_DTYPE)
    return out


def write_shard(index: int, ids: np.ndarray, identity: str, opts: ExportOptions) -> dict[str, Any]:
    """Write output shard `index` of the rows with global ids `ids` (in order); returns its
    stats.

    The rows' metadata is read here, from the parts holding them. The takedown list is read
    again here, so a row listed since the spec was resolved is left out. The stats file is
    written last: its presence (with this `identity`) means done.
    """
    start = time.time()
    rows = gather_rows(opts, np.asarray(ids, dtype=np.int64))
    blocked = np.asarray(Takedown.load(opts.collection).blocked_mask(rows), dtype=bool)
    if blocked.any():
        rows = rows.filter(pa.array(~blocked))
    images: list[bytes] | None = None
    missing: list[dict[str, str]] = []
    fetched = member_bytes = 0
    read_s = 0.0
    if opts.format != S.EXPORT_URLS:
        t_read = time.time()
        found, batch = read_source_images(rows, index)
        read_s = time.time() - t_read
        keep = np.array([data is not None for data in found], dtype=bool)
        missing = [
            {"key": rows[S.KEY][i].as_py(), "reason": f.kind, "why": f.why}
            for i, f in enumerate(batch.found)
            if f.data is None
        ]
        for m in missing:
            log.warning("output shard %05d leaves out key %r: %s", index, m["key"], m["why"])
        if missing:
            rows = rows.filter(pa.array(keep))
        images = [data for data in found if data is not None]
        fetched, member_bytes = batch.bytes_fetched, batch.member_bytes
    keys = rows[S.KEY].to_pylist()
    captions = rows[S.CAPTION].to_pylist()
    columns = json_columns(rows.column_names)
    dims: list[tuple[int | None, int | None]] = [(None, None)] * len(rows)
    if images is not None:
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
        "failed_to_download": len(missing),
        "status_dict": {"success": len(rows), **Counter(m["reason"] for m in missing)},
        "missing": missing,
        S.MANIFEST_BYTES_FETCHED: fetched,
        S.MANIFEST_MEMBER_BYTES: member_bytes,
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
