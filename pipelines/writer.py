"""Write one collection part atomically, and read back what earlier runs committed.

Files go to `<name>.tmp` first and are renamed into place; the `_done/{N}.json` stats are
written last, so a part without them is incomplete and gets redone (img2dataset's rule).
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import time
from typing import Any, Sequence

import numpy as np

from curation import schema as S

log = logging.getLogger(__name__)
TMP_SUFFIX = ".tmp"


def _fs(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


def _put_bytes(url: str, data: bytes) -> None:
    """Write bytes to `url` via a temporary name, then rename into place."""
    fs, path = _fs(url)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp = path + TMP_SUFFIX
    with fs.open(tmp, "wb") as fh:
        fh.write(data)
    fs.mv(tmp, path)


def _column(name: str, values: list[Any]):
    """An arrow array for a source field; mixed or nested-odd values fall back to JSON text."""
    import pyarrow as pa

    try:
        arr = pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        arr = pa.array([None if v is None else json.dumps(v, default=str) for v in values], pa.string())
    if pa.types.is_null(arr.type):  # all-null: give it a type other parts can union with
        arr = arr.cast(pa.string())
    return arr


def metadata_table(rows: Sequence[dict[str, Any]]):
    """Rows -> arrow table: fixed columns typed per the schema, then source fields in order."""
    import pyarrow as pa

    arrays, names = [], []
    for name in S.METADATA_COLUMNS:
        arrays.append(pa.array([r.get(name) for r in rows], getattr(pa, S.METADATA_TYPES[name])()))
        names.append(name)
    extra: dict[str, None] = {}
    for r in rows:
        for name in r:
            if name not in S.METADATA_TYPES:
                extra.setdefault(name)
    for name in extra:
        arrays.append(_column(name, [r.get(name) for r in rows]))
        names.append(name)
    return pa.Table.from_arrays(arrays, names=names)


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def write_part(output: str, n: int, rows: Sequence[dict[str, Any]], img_emb: np.ndarray,
               text_emb: np.ndarray, stats: dict[str, Any]) -> None:
    """Commit part n: embeddings, then metadata, then the `_done` stats (the completion mark)."""
    import pyarrow.parquet as pq

    ok = sum(1 for r in rows if r.get(S.EMB_ROW) is not None)
    if not (len(img_emb) == len(text_emb) == ok):
        raise ValueError(f"part {n}: {ok} embedded rows but {len(img_emb)} image and "
                         f"{len(text_emb)} text vectors")
    layout = S.CollectionLayout(output)
    _put_bytes(layout.img_emb(n), _npy_bytes(img_emb.astype(S.EMB_DTYPE, copy=False)))
    _put_bytes(layout.text_emb(n), _npy_bytes(text_emb.astype(S.EMB_DTYPE, copy=False)))
    buf = io.BytesIO()
    pq.write_table(metadata_table(rows), buf)
    _put_bytes(layout.metadata(n), buf.getvalue())
    _put_bytes(layout.done(n), json.dumps(stats, indent=2, default=str).encode())


def read_done(output: str, n: int) -> dict[str, Any] | None:
    """The committed stats of part n, or None when the part is absent or incomplete."""
    fs, path = _fs(S.CollectionLayout(output).done(n))
    try:
        with fs.open(path, "rb") as fh:
            return json.loads(fh.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("part %d: unreadable done marker %s (%s); redoing it", n, path, exc)
        return None


def clear_parts(output: str) -> int:
    """Remove every part file and done marker (for --overwrite); indices and subsets stay."""
    layout = S.CollectionLayout(output)
    removed = 0
    for folder in (layout.done_dir, layout.metadata_dir, layout.img_emb_dir, layout.text_emb_dir):
        fs, path = _fs(folder)
        if fs.exists(path):
            for f in fs.ls(path, detail=False):
                fs.rm(f)
                removed += 1
    return removed


def write_collection_json(output: str, info: dict[str, Any]) -> dict[str, Any]:
    """Write collection.json (schema version, model, dim, source, counts) atomically."""
    doc = {"schema_version": S.SCHEMA_VERSION,
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **info}
    _put_bytes(S.CollectionLayout(output).collection_json, json.dumps(doc, indent=2, default=str).encode())
    return doc


def read_collection_json(output: str) -> dict[str, Any] | None:
    fs, path = _fs(S.CollectionLayout(output).collection_json)
    try:
        with fs.open(path, "rb") as fh:
            return json.loads(fh.read())
    except FileNotFoundError:
        return None
