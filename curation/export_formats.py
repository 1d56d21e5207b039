"""Write one export shard's bytes: webdataset tars and img2dataset-style parquet.

A shard of small samples is tens of thousands of tar members, and per-member Python (a
`tarfile.TarInfo`, a `json.dumps`, an `np.save`) cost many times the bytes it wrote (measured
with `python -m bench.curation`). So every per-member step is done for a block of samples at
once: ustar headers are filled in as one numpy array, each row's json comes from DuckDB's
`to_json` over the Arrow table, `.npy` members are one header tiled before the vectors, and a
block is joined into one buffer and written with one call. The bytes are deterministic (fixed
times, modes and owners), so a rerun writes identical shards.
"""

from __future__ import annotations

import io
import tarfile
import threading
from typing import Any, BinaryIO

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from collection import schema as S
from collection.storage import atomic_open
from pipelines.embed_writer import npy_bytes

#: tar member times: fixed, so a rerun writes byte-identical shards
MTIME = 1_700_000_000
#: samples joined into one buffer per write
BLOCK = 512
_PAD = [b"\0" * n for n in range(512)]
_NAME = 100


def _octal(values: np.ndarray, digits: int) -> np.ndarray:
    """ASCII octal digits (most significant first) of each value: shape (len(values), digits)."""
    shifts = 3 * np.arange(digits - 1, -1, -1, dtype=np.int64)
    return ((values[:, None].astype(np.int64) >> shifts) & 7).astype(np.uint8) + ord("0")


def _fixed_header() -> np.ndarray:
    block = np.zeros(512, np.uint8)
    for start, text in (
        (100, b"0000644\0"),
        (108, b"0000000\0"),
        (116, b"0000000\0"),
        (156, b"0"),
        (257, b"ustar\x0000"),
        (136, b"%011o\0" % MTIME),
    ):
        block[start : start + len(text)] = np.frombuffer(text, np.uint8)
    return block


_FIXED = _fixed_header()


def tar_headers(names: list[bytes], sizes: np.ndarray) -> list[bytes]:
    """ustar headers for members of the given names and sizes (mode 644, fixed time, no owner).

    Names over 100 bytes get tarfile's pax form (extra blocks before the header), as tarfile
    would write them.
    """
    n = len(names)
    h = np.tile(_FIXED, (n, 1))
    h[:, :_NAME] = np.array(names, dtype=f"S{_NAME}").view(np.uint8).reshape(n, _NAME)
    h[:, 124:135] = _octal(np.asarray(sizes), 11)
    h[:, 148:156] = ord(" ")
    h[:, 148:154] = _octal(h.sum(axis=1, dtype=np.int64), 6)
    h[:, 154] = 0
    raw = h.tobytes()
    out = [raw[i * 512 : (i + 1) * 512] for i in range(n)]
    for i, name in enumerate(names):
        if len(name) > _NAME:
            info = tarfile.TarInfo(name.decode("utf-8", "surrogateescape"))
            info.size, info.mtime, info.mode = int(sizes[i]), MTIME, 0o644
            out[i] = info.tobuf(format=tarfile.PAX_FORMAT)
    return out


def npy_members(vectors: np.ndarray) -> list[memoryview]:
    """`.npy` bytes of each row of a 2-d array: np.save's header, made once, before each row."""
    empty = np.zeros(vectors.shape[1], dtype=vectors.dtype)
    head = np.frombuffer(
        npy_bytes(empty)[: -empty.nbytes] if empty.nbytes else npy_bytes(empty), np.uint8
    )
    rows = np.empty((len(vectors), len(head) + empty.nbytes), np.uint8)
    rows[:, : len(head)] = head
    rows[:, len(head) :] = np.ascontiguousarray(vectors).view(np.uint8).reshape(len(vectors), -1)
    view = memoryview(rows.tobytes())
    width = rows.shape[1]
    return [view[i * width : (i + 1) * width] for i in range(len(vectors))]


def json_lines(table: pa.Table) -> list[bytes]:
    """Each row of `table` as a JSON object (columns in order; NaN written as null)."""
    cols = []
    for name in table.column_names:
        col = table[name]
        if pa.types.is_floating(col.type):
            col = pc.if_else(pc.is_nan(col), pa.scalar(None, col.type), col)
        cols.append(col)
    clean = pa.table(cols, names=table.column_names)
    con = _connection()
    con.register("rec", clean)
    try:
        out = con.sql("SELECT CAST(to_json(rec) AS BLOB) AS j FROM rec").to_arrow_table()["j"]
    finally:
        con.unregister("rec")
    return out.to_pylist()


_LOCAL = threading.local()


def _connection() -> duckdb.DuckDBPyConnection:
    """This thread's in-memory DuckDB, made once
    (a connection costs more than a small shard's json)."""
    if getattr(_LOCAL, "con", None) is None:
        _LOCAL.con = duckdb.connect(config={"threads": 1})
    return _LOCAL.con


def write_webdataset(
    path: str,
    keys: list[str],
    images: list[bytes],
    captions: list[str | None],
    records: list[bytes],
    embeddings: dict[str, np.ndarray],
) -> int:
    """Write the tar atomically: per sample jpg, txt, json, then each
    modality's `.npy`; returns bytes."""
    ext = {S.MODALITY_IMAGE: S.EXPORT_IMG_EMB_EXT, S.MODALITY_TEXT: S.EXPORT_TXT_EMB_EXT}
    suffixes = [S.EXPORT_IMAGE_EXT, S.EXPORT_TEXT_EXT, S.EXPORT_JSON_EXT] + [
        ext[m] for m in embeddings
    ]
    written = 0
    with atomic_open(path) as fh:
        for start in range(0, len(keys), BLOCK):
            stop = min(start + BLOCK, len(keys))
            written += _write_block(
                fh,
                keys[start:stop],
                suffixes,
                [
                    images[start:stop],
                    [(c or "").encode("utf-8") for c in captions[start:stop]],
                    records[start:stop],
                    *(npy_members(v[start:stop]) for v in embeddings.values()),
                ],
            )
        fh.write(b"\0" * 1024)  # two zero blocks end a tar
        written += 1024
    return written


def _write_block(
    fh: BinaryIO, keys: list[str], suffixes: list[str], members: list[list[Any]]
) -> int:
    names = [f"{k}.{s}".encode("utf-8") for k in keys for s in suffixes]
    sizes = np.array([len(m[i]) for i in range(len(keys)) for m in members], dtype=np.int64)
    headers = tar_headers(names, sizes)
    parts: list[Any] = []
    j = 0
    for i in range(len(keys)):
        for m in members:
            data = m[i]
            parts += (headers[j], data, _PAD[-len(data) % 512])
            j += 1
    blob = b"".join(parts)
    fh.write(blob)
    return len(blob)


def write_parquet(
    path: str, table: pa.Table, images: list[bytes] | None, embeddings: dict[str, np.ndarray]
) -> int:
    """img2dataset's parquet output (image bytes under `jpg`) plus our columns and embeddings,
    atomically; without images, the url + caption table img2dataset can download again."""
    if images is not None:
        table = table.append_column(S.EXPORT_IMAGE_COLUMN, pa.array(images, pa.binary()))
    names = {S.MODALITY_IMAGE: S.EXPORT_IMG_EMB_COLUMN, S.MODALITY_TEXT: S.EXPORT_TXT_EMB_COLUMN}
    for modality, vectors in embeddings.items():
        flat = pa.array(vectors.astype(np.float32).reshape(-1), pa.float32())
        table = table.append_column(
            names[modality], pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
        )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    with atomic_open(path) as fh:
        fh.write(buf.getvalue())
    return buf.tell()
