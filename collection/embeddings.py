"""A collection's embeddings of one modality, addressed by global id, one part in memory at a time.

Local parts are memory-mapped; remote ones (any fsspec URL) are read by byte range, row by row
block, so a gather of a few ids fetches those rows and not the part.
"""

from __future__ import annotations

import mmap
import os
import posixpath
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import numpy as np

from collection import schema as S
from collection.parts import CollectionError, by_part, complete_parts, part_offsets
from collection.storage import REMOTE_ERRORS, is_local, url_to_fs

#: enough bytes for any .npy header numpy writes
_HEADER_BYTES = 4096
#: rows this many bytes apart or closer are read in one request (the rows between come along)
MERGE_GAP = 64 << 10
#: madvise(2) advice that maps a range's pages from the page cache (Linux 5.14); not in `mmap`
_MADV_POPULATE_READ = 22
_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


class RemoteNpy:
    """A 2-d .npy file on an object store, read by byte range: `arr[rows]` fetches those rows
    (and the short gaps between them) only."""

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
        #: embedding bytes fetched so far (what a search's exact re-rank costs on an object store)
        self.bytes_read = 0

    def _read(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:  # an empty range request would fetch the whole object on some stores
            return np.empty((0, self.shape[1]), dtype=self.dtype)
        data = self.fs.cat_file(
            self.path,
            start=self.header_size + start * self._row,
            end=self.header_size + stop * self._row,
        )
        self.bytes_read += len(data)
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
        return self.take(rows)

    def take(self, rows: Any, merge_gap: int = MERGE_GAP) -> np.ndarray:
        """The given rows, fetched by range; rows up to `merge_gap` bytes apart share a request
        (fewer requests for an export's rows; 0 for a search's re-rank, which reads its k rows
        and nothing between them)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1:
            raise TypeError("RemoteNpy takes a 1-d array of row numbers")
        if not len(rows):
            return np.empty((0, self.shape[1]), dtype=self.dtype)
        wanted, back = np.unique(rows, return_inverse=True)
        # one range request per run of rows whose gaps are small: a request costs more than
        # MERGE_GAP bytes of transfer on an object store
        gap_rows = max(0, merge_gap // max(self._row, 1))
        breaks = np.nonzero(np.diff(wanted) - 1 > gap_rows)[0] + 1
        firsts = wanted[np.concatenate([[0], breaks])]
        lasts = wanted[np.concatenate([breaks, [len(wanted)]]) - 1]
        chunks = self.fs.cat_ranges(
            [self.path] * len(firsts),
            [int(self.header_size + a * self._row) for a in firsts],
            [int(self.header_size + (b + 1) * self._row) for b in lasts],
        )
        for c in chunks:
            if isinstance(c, BaseException):
                raise CollectionError(f"{self.url}: range read failed: {c}")
            self.bytes_read += len(c)
        block = np.frombuffer(b"".join(chunks), dtype=self.dtype).reshape(-1, self.shape[1])
        # where each span starts in `block`, then each wanted row's position there
        span_start = np.concatenate([[0], np.cumsum(lasts - firsts + 1)[:-1]])
        span = np.searchsorted(firsts, wanted, side="right") - 1
        return block[span_start[span] + wanted - firsts[span]][back]


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


def read_whole(arr: np.ndarray | RemoteNpy) -> np.ndarray:
    """A whole part in memory. A memory-mapped part is read with one sequential read instead
    of through its mapping: a pass over every part would otherwise leave each part's pages
    mapped and counted in the process's resident memory (10 GB after one pass at 10M rows)."""
    if isinstance(arr, np.memmap) and arr.filename:
        return np.load(arr.filename)
    return np.asarray(arr)


def read_block(arr: np.ndarray | RemoteNpy, lo: int, hi: int) -> np.ndarray:
    """Rows lo..hi of one part in memory. A memory-mapped part is read with one pread instead of
    through its mapping, as `read_whole` does, so a pass in blocks maps nothing either."""
    if isinstance(arr, np.memmap) and arr.filename and arr.flags.c_contiguous:
        hi = min(hi, arr.shape[0])
        out = np.empty((max(hi - lo, 0), *arr.shape[1:]), arr.dtype)
        view = memoryview(out.reshape(-1)).cast("B")
        start, done = arr.offset + lo * (out.nbytes // max(len(out), 1)), 0
        with open(arr.filename, "rb") as fh:
            while done < len(view):  # one call reads at most ~2 GB
                got = os.preadv(fh.fileno(), [view[done:]], start + done)
                if not got:
                    raise CollectionError(f"{arr.filename}: shorter than its .npy header says")
                done += got
        return out
    return np.asarray(arr[lo:hi])


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

    def to_local(self, folder: str) -> EmbeddingStore:
        """This store with its remote parts copied into the local `folder` (one sequential read
        each) and memory-mapped: for work that reads every row several times, as an index build
        does. Ids are unchanged; a local store is returned as it is."""
        if not any(isinstance(a, RemoteNpy) for a in self.arrays):
            return self
        os.makedirs(folder, exist_ok=True)
        arrays = []
        for arr in self.arrays:
            if isinstance(arr, RemoteNpy):
                path = os.path.join(folder, posixpath.basename(arr.path))
                try:
                    arr.fs.get_file(arr.path, path)
                except REMOTE_ERRORS as exc:
                    raise CollectionError(
                        f"{arr.url}: cannot copy: {type(exc).__name__}: {exc}"
                    ) from None
                arr = np.load(path, mmap_mode="r")
            arrays.append(arr)
        return replace(self, arrays=arrays)

    @property
    def bytes_read(self) -> int:
        """Bytes fetched by range reads so far (0 where the parts are memory-mapped)."""
        return sum(getattr(a, "bytes_read", 0) for a in self.arrays)

    def iter_parts(self, dtype: Any = np.float32) -> Iterator[tuple[int, np.ndarray]]:
        """(first global id, vectors) per part; one part in memory at a time."""
        for start, arr in zip(self.offsets[:-1], self.arrays):
            if arr.shape[0]:
                yield int(start), np.ascontiguousarray(read_whole(arr), dtype=dtype)

    def gather(
        self, ids: np.ndarray, dtype: Any = np.float32, merge_gap: int = MERGE_GAP
    ) -> np.ndarray:
        """Vectors of the given global ids (reads only those rows); float32 for arithmetic, or the
        stored float16 (`dtype=S.EMB_DTYPE`) to copy them elsewhere. `merge_gap`: see
        `RemoteNpy.take` (remote parts only)."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.dim), dtype=dtype)
        if not len(ids):
            return out
        for p, sel, rows in by_part(self.offsets, ids):  # rows ascending: file order
            arr = self.arrays[p]
            if isinstance(arr, RemoteNpy):
                out[sel] = arr.take(rows, merge_gap)
            else:  # a plain view: np.memmap's subclass bookkeeping costs more than a small take
                out[sel] = arr.view(np.ndarray)[rows]
        return out

    def read_rows(self, ids: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
        """Vectors of `ids`, as `gather` gives them, but local parts are read with pread instead
        of through their memory maps. For a process that reads rows spread over the whole
        collection (a training sample, a tuner's batch re-rank): through a map, the kernel maps
        the 16 pages around each row read (fault-around, which MADV_RANDOM does not turn off),
        so a sample of one row in 30 left 10 GB of the 10M collection resident in the driver."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.dim), dtype=dtype)
        for p, sel, rows in by_part(self.offsets, ids):  # rows ascending: file order
            arr = self.arrays[p]
            if not isinstance(arr, np.memmap) or not arr.flags.c_contiguous:
                out[sel] = self.gather(ids[sel], dtype)
                continue
            size = arr.shape[1] * arr.dtype.itemsize
            buf = np.empty((len(rows), arr.shape[1]), arr.dtype)
            with open(arr.filename, "rb") as fh:
                fd = fh.fileno()
                for i, r in enumerate(rows.tolist()):
                    os.preadv(fd, [memoryview(buf[i])], arr.offset + r * size)
            out[sel] = buf
        return out

    def drop_pages(self) -> None:
        """Unmap the pages the memory maps have touched (the page cache keeps them): a process
        that measures searches one after another would otherwise end up with every page of
        the collection counted in its resident memory."""
        for arr in self.arrays:
            m = getattr(arr, "_mmap", None)
            if isinstance(m, mmap.mmap):
                m.madvise(mmap.MADV_DONTNEED)

    def populate(self, ids: np.ndarray) -> None:
        """Map the pages of `ids`' rows (MADV_POPULATE_READ) without reading them through the
        CPU: the state of a server whose maps have been touched by earlier queries, for a
        latency measure that must not hold every page (`drop_pages` undoes it). Kernels older
        than 5.14 refuse the advice: the rows are then read once instead."""
        ids = np.asarray(ids, dtype=np.int64)
        for p, sel, rows in by_part(self.offsets, ids):
            arr = self.arrays[p]
            m = getattr(arr, "_mmap", None)
            if not isinstance(m, mmap.mmap):
                continue
            size = arr.shape[1] * arr.dtype.itemsize
            first = arr.offset % mmap.ALLOCATIONGRANULARITY + rows * size  # where the map starts
            pages = np.unique(np.concatenate([first, first + size - 1]) // mmap.PAGESIZE)
            breaks = np.flatnonzero(np.diff(pages) > 1) + 1
            try:
                for run in np.split(pages, breaks):
                    start = int(run[0]) * mmap.PAGESIZE
                    m.madvise(_MADV_POPULATE_READ, start, len(run) * mmap.PAGESIZE)
            except OSError:
                self.gather(ids[sel])

    def sample(self, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(ids, float32 vectors) of n distinct random rows, for training and held-out queries;
        read with `read_rows`, so sampling leaves nothing mapped."""
        rng = np.random.default_rng(seed)
        n = min(n, self.count)
        ids = np.sort(rng.choice(self.count, size=n, replace=False))
        return ids, self.read_rows(ids)
