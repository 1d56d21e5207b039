"""Read a collection's parts: done markers, memory-mapped float16 embeddings, metadata.

A vector's global id is its position in the concatenation of all complete parts in order of
N (DESIGN.md), so every reader here walks parts in that order and never loads them all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation import schema as S


class CollectionError(ValueError):
    """The collection folder is missing a file or field this stage needs."""


def complete_parts(root: str) -> list[int]:
    """Part numbers with a `_done` marker, sorted: only those are indexed or served."""
    layout = S.CollectionLayout(root)
    if not os.path.isdir(layout.done_dir):
        raise CollectionError(f"{layout.done_dir}: no _done folder; is {root!r} a collection?")
    parts = []
    for name in os.listdir(layout.done_dir):
        stem, ext = os.path.splitext(name)
        if ext == ".json" and stem.isdigit():
            parts.append(int(stem))
    if not parts:
        raise CollectionError(f"{layout.done_dir}: no complete parts")
    return sorted(parts)


@dataclass
class EmbeddingStore:
    """Memory-mapped embeddings of one modality across parts, addressed by global id."""

    root: str
    modality: str
    parts: list[int] = field(default_factory=list)
    arrays: list[np.ndarray] = field(default_factory=list)
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))

    @classmethod
    def open(cls, root: str, modality: str = S.MODALITY_IMAGE) -> "EmbeddingStore":
        layout = S.CollectionLayout(root)
        parts = complete_parts(root)
        arrays = []
        for n in parts:
            path = layout.emb(modality, n)
            if not os.path.exists(path):
                raise CollectionError(f"{path}: missing {modality} embeddings of part {n}")
            arr = np.load(path, mmap_mode="r")
            if arr.ndim != 2:
                raise CollectionError(f"{path}: expected a 2-d array, got shape {arr.shape}")
            arrays.append(arr)
        dims = {a.shape[1] for a in arrays if a.shape[0]}
        if len(dims) > 1:
            raise CollectionError(f"{root}: parts disagree on the embedding dim: {sorted(dims)}")
        offsets = np.concatenate([[0], np.cumsum([a.shape[0] for a in arrays])]).astype(np.int64)
        return cls(root, modality, parts, arrays, offsets)

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
                yield int(start), np.ascontiguousarray(arr, dtype=dtype)

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


def read_metadata(root: str, columns: list[str] | None = None):
    """pyarrow Table of the successful rows of every complete part, in global-id order."""
    layout = S.CollectionLayout(root)
    tables = []
    for n in complete_parts(root):
        path = layout.metadata(n)
        if not os.path.exists(path):
            raise CollectionError(f"{path}: missing metadata of part {n}")
        t = pq.read_table(path)
        if S.EMB_ROW not in t.column_names:
            raise CollectionError(f"{path}: no {S.EMB_ROW!r} column")
        t = t.filter(pc.is_valid(t[S.EMB_ROW]))
        t = t.take(pc.sort_indices(t, sort_keys=[(S.EMB_ROW, "ascending")]))
        if columns is not None:
            t = t.select([c for c in columns if c in t.column_names])
        tables.append(t)
    return pa.concat_tables(tables, promote_options="default")
