"""What the insight modules (dedup, concepts, uniqueness, map) read from a collection: keys,
embeddings, the index and every vector's nearest neighbours, each missing piece reported in
one line that says which command makes it.
"""

from __future__ import annotations

import io
from typing import Any, Sequence

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from collection import schema as S
from collection.embeddings import EmbeddingStore
from collection.parts import CollectionError, complete_parts, read_metadata
from collection.storage import is_local, read_json, url_to_fs, write_bytes
from indices.build import load_index
from indices.tune import set_search_params


def open_store(collection: str, modality: str = S.MODALITY_IMAGE) -> EmbeddingStore:
    """The collection's embeddings of one modality, memory-mapped when local and range-read when
    remote (CollectionError naming the URL when absent or unreachable)."""
    if modality not in S.MODALITIES:
        raise ValueError(f"modality: unknown {modality!r}; expected one of {list(S.MODALITIES)}")
    complete_parts(collection)  # a missing, unreachable or non-collection URL, said in one line
    layout = S.CollectionLayout(collection)
    folder = layout.img_emb_dir if modality == S.MODALITY_IMAGE else layout.text_emb_dir
    fs, path = url_to_fs(folder)
    if not fs.isdir(path):
        raise CollectionError(
            f"{collection}: no {modality} embeddings ({folder}); "
            "run `python -m pipelines.embed` first"
        )
    store = EmbeddingStore.open(collection, modality)
    if store.count == 0:
        raise CollectionError(f"{collection}: no {modality} embeddings to work on")
    return store


def read_rows(store: EmbeddingStore, ids: np.ndarray) -> np.ndarray:
    """float32 vectors of `ids` read without mapping them (`EmbeddingStore.read_rows`)."""
    return store.read_rows(ids)


def read_keys(collection: str) -> np.ndarray:
    """Keys of the embedded samples in global-id order (position = the vector's id)."""
    return np.asarray(read_metadata(collection, [S.KEY]).column(S.KEY).to_pylist(), dtype=object)


def ids_of(
    keys: np.ndarray | pa.Array | pa.ChunkedArray,
    wanted: Sequence[str] | pa.Array | pa.ChunkedArray,
    what: str,
) -> np.ndarray:
    """Global ids of `wanted` keys; an unknown key is a ValueError naming it (and `what` they
    are). `keys` and `wanted` may be Arrow (`read_metadata`'s column, a table's column): looked up
    by Arrow's hash join, with no Python object per row."""
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    elif not isinstance(keys, pa.Array):
        keys = pa.array(keys, pa.string())
    if isinstance(wanted, (pa.Array, pa.ChunkedArray)):
        want = wanted.cast(pa.string())
    else:
        want = pa.array(list(wanted), pa.string())
    found = pc.index_in(want, value_set=keys.cast(pa.string()))
    unknown = pc.is_null(found)
    count = pc.sum(unknown).as_py() or 0
    if count:
        missing = want.filter(unknown)[:5].to_pylist()
        shown = ", ".join(map(str, missing)) + (f" (and {count - 5} more)" if count > 5 else "")
        raise ValueError(f"{what}: unknown key{'s' if count > 1 else ''} {shown}")
    return found.to_numpy(zero_copy_only=False).astype(np.int64)


def load_collection_index(
    collection: str, modality: str = S.MODALITY_IMAGE
) -> tuple[Any, dict[str, Any]]:
    """(faiss index with its tuned search parameters, its json); CollectionError naming the
    build command. A local index is memory-mapped; a remote one is read into memory."""
    layout = S.CollectionLayout(collection)
    path = layout.index(modality)
    doc = read_json(layout.index_json(modality))
    fs, fpath = url_to_fs(path)
    if doc is None or not fs.exists(fpath):
        raise CollectionError(
            f"{collection} has no {modality} index; "
            f"build it with `python -m indices.build {collection}`"
        )
    if is_local(path):
        index = load_index(fpath)
    else:
        index = faiss.deserialize_index(np.frombuffer(fs.cat_file(fpath), dtype=np.uint8))
    set_search_params(index, doc.get("params", {}))
    return index, doc


def matching_index(
    collection: str, store: EmbeddingStore, modality: str = S.MODALITY_IMAGE
) -> tuple[Any, dict[str, Any]]:
    """`load_collection_index`, refused (naming the build command) when the index does not hold
    exactly the store's vectors."""
    index, doc = load_collection_index(collection, modality)
    if index.ntotal != store.count:
        raise CollectionError(
            f"{collection}: the {modality} index holds {index.ntotal} vectors but the collection "
            f"{store.count}; rebuild it with `python -m indices.build {collection}`"
        )
    return index, doc


def check_index(collection: str, modality: str, count: int) -> dict[str, Any]:
    """The index's json, without loading the index: CollectionError naming the build command
    when it is missing or holds another number of vectors than the collection."""
    layout = S.CollectionLayout(collection)
    doc = read_json(layout.index_json(modality))
    fs, fpath = url_to_fs(layout.index(modality))
    if doc is None or not fs.exists(fpath):
        raise CollectionError(
            f"{collection} has no {modality} index; "
            f"build it with `python -m indices.build {collection}`"
        )
    if doc.get("count") is not None and int(doc["count"]) != count:
        raise CollectionError(
            f"{collection}: the {modality} index holds {doc['count']} vectors but the collection "
            f"{count}; rebuild it with `python -m indices.build {collection}`"
        )
    return doc


def neighbours(
    collection: str,
    k: int,
    modality: str = S.MODALITY_IMAGE,
    store: EmbeddingStore | None = None,
    batch: int = 2048,
) -> tuple[np.ndarray, np.ndarray]:
    """Every vector's k nearest other vectors through the collection's index: (ids, cosines),
    each (n, k) (`block_neighbours` on every part; the uniqueness job runs it per part).

    Candidates come from the index (searched at its tuned parameters, as deep as its re-rank
    depth), similarities are recomputed exactly from the embeddings and sorted; a vector is
    never its own neighbour. Rows with fewer than k others hold -1 and NaN.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    store = store or open_store(collection, modality)
    index, doc = matching_index(collection, store, modality)
    depth = search_depth(doc, store.count, k)
    out_ids = np.full((store.count, k), -1, dtype=np.int64)
    out_sims = np.full((store.count, k), np.nan, dtype=np.float32)
    for start, part in store.iter_parts():
        for lo in range(0, len(part), batch):
            q = np.ascontiguousarray(part[lo : lo + batch], dtype=np.float32)
            top_ids, top_sims = search_batch(index, store, q, start + lo, depth, k)
            out_ids[start + lo : start + lo + len(q), : top_ids.shape[1]] = top_ids
            out_sims[start + lo : start + lo + len(q), : top_ids.shape[1]] = top_sims
    return out_ids, out_sims


def search_depth(doc: dict[str, Any], count: int, k: int) -> int:
    """How many index results to re-rank exactly for k neighbours: the index's tuned re-rank
    depth, at least 2k + 2, at most the collection."""
    return min(count, max(k + 1, int(doc.get("params", {}).get("rerank_k", 0)), 2 * k + 2))


def search_batch(
    index: Any, store: EmbeddingStore, q: np.ndarray, first: int, depth: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest other vectors of the queries `q` (float32, global ids first, first + 1,
    ...): (ids, cosines), each (len(q), <= k), cosines recomputed exactly from the store and
    sorted; -1 / NaN where there are fewer. One batch of `neighbours`, usable by a task."""
    qids = np.arange(first, first + len(q))
    _, cand = index.search(q, depth)
    cand = np.where(cand == qids[:, None], -1, cand)  # never one's own neighbour
    flat = np.unique(cand[cand >= 0])
    if not len(flat):  # a one-vector collection has no neighbours
        return np.full((len(q), 0), -1, np.int64), np.full((len(q), 0), np.nan, np.float32)
    vecs = store.gather(flat)
    pos = np.searchsorted(flat, np.maximum(cand, 0))
    sims = np.einsum("qd,qkd->qk", q, vecs[pos])
    sims[cand < 0] = -np.inf
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    top_ids = np.take_along_axis(cand, order, axis=1)
    top_sims = np.take_along_axis(sims, order, axis=1).astype(np.float32)
    top_sims[top_ids < 0] = np.nan
    return top_ids, top_sims


def write_table(path: str, table: pa.Table) -> None:
    """A parquet file written atomically (collection.storage) on any fsspec URL."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes(path, buf.getvalue())


def read_table(path: str, what: str) -> pa.Table:
    """A parquet file; FileNotFoundError naming `what` (the command that writes it) when absent."""
    fs, p = url_to_fs(path)
    if not fs.exists(p):
        raise FileNotFoundError(f"{path}: no {what}")
    with fs.open(p, "rb") as fh:
        return pq.read_table(fh)
