"""Merge part indices into one IVF index whose inverted lists live in a file of their own.

The parts' lists are joined into an `OnDiskInvertedLists` file (`indices/{modality}.ivfdata`),
as `faiss.contrib.ondisk.merge_ondisk` does but releasing the parts afterwards (that helper
disowns them, so every part stays mapped for the rest of the process: 2 GB at 1M rows), and
the index file keeps only the quantizer and that file's name; search reads it with
`faiss.IO_FLAG_ONDISK_SAME_DIR`, so the lists are memory-mapped. Both files
are written under temporary names and renamed into place after the modality's json is removed:
a merge cut short leaves no index that looks complete (the builder writes the json last).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import faiss

from collection import schema as S
from collection.storage import atomic_path, url_to_fs

log = logging.getLogger(__name__)

IVFDATA_EXT = ".ivfdata"


def ivfdata_path(index_path: str) -> str:
    """Where the inverted lists of the on-disk index at `index_path` live."""
    return os.path.splitext(index_path)[0] + IVFDATA_EXT


def merge_lists(index: Any, parts: Sequence[str], data: str) -> None:
    """Join the parts' inverted lists (read memory-mapped, never loaded) into on-disk lists at
    `data`, which become the empty trained `index`'s lists; the parts are unmapped on return."""
    loaded = [faiss.read_index(p, faiss.IO_FLAG_MMAP) for p in parts]
    ivf = faiss.extract_index_ivf(index)
    if index.ntotal:
        raise ValueError(f"{data}: merging into an index that already holds vectors")
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, data)
    sources = faiss.InvertedListsPtrVector()
    for part in loaded:
        sources.push_back(faiss.extract_index_ivf(part).invlists)
    ntotal = lists.merge_from_multiple(sources.data(), sources.size(), False)
    index.ntotal = ivf.ntotal = ntotal
    ivf.replace_invlists(lists, True)  # the index owns the on-disk lists from here
    lists.this.disown()
    del sources, loaded  # each part index frees (and unmaps) its own lists


def merge_parts(
    root: str, modality: str, trained: str, parts: Sequence[str], index_path: str
) -> str:
    """Merge the part indices (in id order) into the empty `trained` index, written on disk at
    `index_path` with its lists beside it; returns the lists' path. Parts are read
    memory-mapped, so the merge never holds the collection's vectors."""
    json_path = url_to_fs(S.CollectionLayout(root).index_json(modality))[1]
    if os.path.exists(json_path):
        os.remove(json_path)  # from here on the old index, if any, no longer looks complete
    index_path = os.path.abspath(index_path)
    data = ivfdata_path(index_path)
    index = faiss.read_index(trained)
    with atomic_path(data) as tmp_data, atomic_path(index_path) as tmp_index:
        merge_lists(index, list(parts), tmp_data)
        lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
        lists.filename = data  # the name it will have; read back by basename, beside the index
        faiss.write_index(index, tmp_index)
        del lists, index  # unmap the lists before their file is renamed
    log.info("%s: merged %d part indices, lists in %s", index_path, len(parts), data)
    return data
