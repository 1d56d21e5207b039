"""A collection's embeddings of one modality, addressed by global id, one part in memory at a time.

Local parts are memory-mapped; remote ones (any fsspec URL) are read by byte range, row by row
block, so a gather of a few ids fetches those rows and not the part.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from collection import schema as S
from collection.parts import CollectionError, complete_parts, part_offsets
from collection.storage import is_local, url_to_fs

#: enough bytes for any .npy header numpy writes
_HEADER_BYTES = 4096
_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


class RemoteNpy:
    """A 2-d .npy file on an object store, read by byte range: `arr[rows]` fetches those rows only."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.path = url_to_fs(url)
        with self.fs.open(self.path, "rb", block_size=_HEADER_BYTES) as fh:
            version = np.lib.format.read_magic(fh)
            read_header = _HEADER_READERS.get(version)
            if read_header is None:
                raise CollectionError(f"{url}: .npy format version {version} is not supported")
            shape, fortran, dtype = read_header(fh)
            self.header_size = fh.tell()
        if fortran or len(shape) != 2:
            raise CollectionError(f"{url}: expected a C-ordered 2-d array, got shape {shape}")
        self.shape: tuple[int, int] = (int(shape[0]), int(shape[1]))
        self.dtype = np.dtype(dtype)
        self.ndim = 2
        self._row = self.shape[1] * self.dtype.itemsize

    def _read(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:  # an empty range request would fetch the whole object on some stores
            return np.empty((0, self.shape[1]), dtype=self.dtype)
        data = self.fs.cat_file(
            self.path,
            start=self.header_size + start * self._row,
            end=self.header_size + stop * self._row,
        )
        return np.frombuffer(data, dtype=self.dtype).reshape(stop - start, self.shape[1])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self._read(0, self.shape[0])
        return arr if dtype is None else arr.astype(dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: Any) -> np.ndarray:
        if isinstance(rows, slice):  # a block of rows (concept scoring reads parts in chunks)
            start, stop, step = rows.indices(self.shape[0])
            if step != 1:
                return self[np.arange(start, stop, step)]
            return self._read(start, stop)
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1:
            raise TypeError("RemoteNpy takes a 1-d array of row numbers")
        if not len(rows):
            return np.empty((0, self.shape[1]), dtype=self.dtype)
        # runs of consecutive rows become one range request each
        breaks = np.nonzero(np.diff(rows) != 1)[0] + 1
        starts = np.concatenate([[0], breaks])
        stops = np.concatenate([breaks, [len(rows)]])
        paths = [self.path] * len(starts)
        begin = [int(self.header_size + rows[a] * self._row) for a in starts]
        end = [int(self.header_size + (rows[b - 1] + 1) * self._row) for b in stops]
        chunks = self.fs.cat_ranges(paths, begin, end)
        for c in chunks:
            if isinstance(c, BaseException):
                raise CollectionError(f"{self.url}: range read failed: {c}")
        return np.frombuffer(b"".join(chunks), dtype=self.dtype).reshape(len(rows), self.shape[1])


def open_npy(url: str) -> np.ndarray | RemoteNpy:
    """A part's embeddings: memory-mapped when local, range-read when remote."""
    if is_local(url):
        path = url_to_fs(url)[1]
        if not os.path.exists(path):
            raise FileNotFoundError(path)
        return np.load(path, mmap_mode="r")
    fs, path = url_to_fs(url)
    if not fs.exists(path):
        raise FileNotFoundError(url)
    return RemoteNpy(url)


@dataclass
class EmbeddingStore:
    """Embeddings of one modality across parts, addressed by global id: memory-mapped when the
    collection is local, read by byte range when it is on an object store."""

    root: str
    modality: str
    parts: list[int] = field(default_factory=list)
    arrays: list[Any] = field(default_factory=list)
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))

    @classmethod
    def open(cls, root: str, modality: str = S.MODALITY_IMAGE) -> "EmbeddingStore":
        layout = S.CollectionLayout(root)
        parts = complete_parts(root)
        arrays = []
        for n in parts:
            path = layout.emb(modality, n)
            try:
                arr = open_npy(path)
            except FileNotFoundError:
                raise CollectionError(
                    f"{path}: missing {modality} embeddings of part {n}"
                ) from None
            if arr.ndim != 2:
                raise CollectionError(f"{path}: expected a 2-d array, got shape {arr.shape}")
            arrays.append(arr)
        dims = {a.shape[1] for a in arrays if a.shape[0]}
        if len(dims) > 1:
            raise CollectionError(f"{root}: parts disagree on the embedding dim: {sorted(dims)}")
        return cls(root, modality, parts, arrays, part_offsets([a.shape[0] for a in arrays]))

    @property
    def count(self) -> int:
        return int(self.offsets[-1])

    @property
    def dim(self) -> int:
        return int(next((a.shape[1] for a in self.arrays if a.shape[0]), 0))

    def iter_parts(self, dtype: Any = np.float32) -> Iterator[tuple[int, np.ndarray]]:
        """(first global id, vectors) per part; one part in memory at a time."""
        for start, arr in zip(self.offsets[:-1], self.arrays):
            if arr.shape[0]:
                yield int(start), np.ascontiguousarray(np.asarray(arr), dtype=dtype)

    def gather(self, ids: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
        """Vectors of the given global ids (reads only those rows from the mmaps); float32 for
        arithmetic, or the stored float16 (`dtype=S.EMB_DTYPE`) to copy them elsewhere."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.dim), dtype=dtype)
        if not len(ids):
            return out
        which = np.searchsorted(self.offsets, ids, side="right") - 1
        for p in np.unique(which):
            sel = np.nonzero(which == p)[0]
            local = ids[sel] - self.offsets[p]
            order = np.argsort(local)  # sorted reads are kinder to the page cache
            out[sel[order]] = self.arrays[p][local[order]]
        return out

    def sample(self, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(ids, float32 vectors) of n distinct random rows, for training and held-out queries."""
        rng = np.random.default_rng(seed)
        n = min(n, self.count)
        ids = np.sort(rng.choice(self.count, size=n, replace=False))
        return ids, self.gather(ids)
