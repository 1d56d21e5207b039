"""Write one collection part atomically, and read back what earlier runs committed.

Each file is written atomically (`collection.storage`); the `_done/{N}.json` stats are written
last, so a part without them is incomplete and gets redone (img2dataset's rule).
"""

from __future__ import annotations

import io
import json
import logging
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from collection import schema as S
from collection.storage import read_json, url_to_fs, write_bytes, write_json

log = logging.getLogger(__name__)


def _column(name: str, values: list[Any]):
    """An arrow array for a source field; mixed or nested-odd values fall back to JSON text."""
    try:
        arr = pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        arr = pa.array(
            [None if v is None else json.dumps(v, default=str) for v in values], pa.string()
        )
    if pa.types.is_null(arr.type):  # all-null: give it a type other parts can union with
        arr = arr.cast(pa.string())
    return arr


def metadata_table(rows: Sequence[dict[str, Any]]):
    """Rows -> arrow table: fixed columns typed per the schema, then source fields in order.
    `caption_length` is always the caption's length in characters, counted here for every writer."""
    arrays, names = [], []
    for name in S.METADATA_COLUMNS:
        if name == S.CAPTION_LENGTH:
            arrays.append(pc.utf8_length(arrays[names.index(S.CAPTION)]).cast(pa.int32()))
        else:
            arrays.append(
                pa.array([r.get(name) for r in rows], getattr(pa, S.METADATA_TYPES[name])())
            )
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


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def write_part(
    output: str,
    n: int,
    rows: Sequence[dict[str, Any]],
    img_emb: np.ndarray,
    text_emb: np.ndarray,
    stats: dict[str, Any],
) -> None:
    """Commit part n: embeddings, then metadata, then the `_done` stats (the completion mark)."""
    ok = sum(1 for r in rows if r.get(S.EMB_ROW) is not None)
    if not (len(img_emb) == len(text_emb) == ok):
        raise ValueError(
            f"part {n}: {ok} embedded rows but {len(img_emb)} image and "
            f"{len(text_emb)} text vectors"
        )
    layout = S.CollectionLayout(output)
    write_bytes(layout.img_emb(n), npy_bytes(img_emb.astype(S.EMB_DTYPE, copy=False)))
    write_bytes(layout.text_emb(n), npy_bytes(text_emb.astype(S.EMB_DTYPE, copy=False)))
    buf = io.BytesIO()
    pq.write_table(metadata_table(rows), buf)
    write_bytes(layout.metadata(n), buf.getvalue())
    write_json(layout.done(n), stats)


def read_done(output: str, n: int) -> dict[str, Any] | None:
    """The committed stats of part n, or None when the part is absent or incomplete."""
    path = S.CollectionLayout(output).done(n)
    try:
        return read_json(path)
    except (OSError, ValueError) as exc:
        log.warning("part %d: unreadable done marker %s (%s); redoing it", n, path, exc)
        return None


def clear_parts(output: str) -> int:
    """Remove every part file and done marker (for --overwrite); indices and subsets stay."""
    layout = S.CollectionLayout(output)
    removed = 0
    for folder in (layout.done_dir, layout.metadata_dir, layout.img_emb_dir, layout.text_emb_dir):
        fs, path = url_to_fs(folder)
        if fs.exists(path):
            for f in fs.ls(path, detail=False):
                fs.rm(f)
                removed += 1
    return removed
