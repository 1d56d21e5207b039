"""Uniqueness by lists: every row's exact k nearest neighbours among the rows of the m inverted
lists nearest its own, with matrix products instead of index searches, in bounded tasks.

The driver plans from centroids alone: about one list per LIST_ROWS rows, so that a row's work
does not grow with the collection. They come from the collection's IVF coarse centroids (or a
k-means on a sample where its index has none), each split by a k-means of the sampled rows it
holds where there are fewer coarse lists than that. It orders the lists so that nearby lists are
adjacent, finds
each list's m nearest lists (its own first) and cuts the order into groups of about `task_rows`
rows. One task per part assigns its rows to lists and writes (list, id, key) sorted by list;
one task per group of lists reads the rows of its lists and of their neighbours, computes the
cosines of each list's rows against its neighbours' rows (at most `candidate_cap`, the nearest to
the list) block by block (float32 GEMM) keeping the running top k, and writes (key, id,
kth_distance). With m = the number of lists the result is the exact k-NN of every row; smaller m
bounds each row's work (`bench.uniqueness_groups` measures what it costs in agreement). The
driver holds centroids and per-list counts, nothing per row.
"""

from __future__ import annotations

import io
import logging
import math
import time
from typing import Any, NamedTuple

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from collection import schema as S
from collection.embeddings import EmbeddingStore
from collection.parts import CollectionError
from collection.storage import file_signature, read_json, url_to_fs, write_bytes
from curation.semdedup import SemanticParams, kmeans
from curation.uniqueness_job import finish_job
from curation.vector_jobs import (
    Runner,
    TaskFolder,
    check_parts,
    part_keys,
    part_params,
    task_folder,
)
from curation.vectors import load_collection_index, open_store, read_rows

log = logging.getLogger(__name__)

#: the neighbour lists each row is compared against by default (its own included): the fewest
#: that agree with exact k-NN better than the index search did at 1M rows (k-th distance within
#: 1e-3 for 98% of rows, against 85%; bench/results/uniqueness_groups.json)
NEIGHBOUR_LISTS = 4
#: query rows per group task (the task also reads its lists' neighbours' rows)
TASK_ROWS = 32768
#: candidate rows per matrix product
BLOCK = 8192
#: above this many lists, rows are assigned through an HNSW graph over the centroids
HNSW_MIN = 1024
#: rows per list: each row is compared with about NEIGHBOUR_LISTS * LIST_ROWS others, whatever
#: the collection's size (at 10M rows an IVF8192 index holds ~1,220 rows a list)
LIST_ROWS = 256
#: sampled rows per list when lists are trained (FAISS's fewest points per centroid)
TRAIN_ROWS = 39
#: coarse lists whose splits a row is assigned among (lists split from coarse ones); with C
#: coarse lists of L a row costs C + ASSIGN_PROBES * L / C products, least at C = sqrt(PROBES L)
ASSIGN_PROBES = 2
#: k-means iterations of a coarse list's split: 39 sampled rows a list settle in few (the splits
#: cost O(L^1.5) in all: 30 of the plan's 68 CPU seconds at 10M rows with 10 iterations); the
#: agreement with exact k-NN this keeps: `bench.uniqueness_groups` (key `lists_1m_no_index`)
SPLIT_ITERATIONS = 5
#: k-means iterations that group nearby lists into tasks (their order only: results do not
#: depend on it; 300 groups of 38k lists at 10M rows)
GROUP_ITERATIONS = 10
#: vectors assigned per search in an assign task
BATCH = 65536
LIST = "list"
PLAN = "plan"
#: schema metadata of an assign task's output: each row group's first list (int64, hex)
FIRST_LISTS = "sieve_first_lists"
#: above this many lists, each list's nearest lists are searched through an IVF over the
#: centroids instead of all of them (all pairs of 38k lists at 10M rows: 1.5 TFLOP)
EXACT_NEAR_MAX = 8192


def index_centroids(collection: str, modality: str) -> np.ndarray | None:
    """The coarse centroids of the collection's IVF index; None when it has no IVF index."""
    layout = S.CollectionLayout(collection)
    fs, path = url_to_fs(layout.index(modality))
    if read_json(layout.index_json(modality)) is None or not fs.exists(path):
        return None
    index, _ = load_collection_index(collection, modality)
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:  # a flat or HNSW index: no lists
        return None
    return np.ascontiguousarray(ivf.quantizer.reconstruct_n(0, ivf.nlist), dtype=np.float32)


def sample_centroids(store: EmbeddingStore, lists: int, seed: int = 0) -> np.ndarray:
    """`lists` spherical k-means centroids trained on a sample of the store."""
    params = SemanticParams(seed=seed)
    rng = np.random.default_rng(seed)
    size = min(store.count, lists * params.points_per_centroid)
    sample = np.sort(rng.choice(store.count, size=size, replace=False))
    return kmeans(read_rows(store, sample), lists, params)


def candidate_cap(m: int) -> int:
    """The most candidates a list's rows meet with m neighbour lists: m lists of LIST_ROWS.
    k-means lists are uneven (at 4M generated rows the largest held 3,318 rows, the median 54,
    the sum of squared sizes 3.7x an even split's), so without a cap a row's work grows with
    the collection (1,189 candidates a row at 1M, 3,150 at 4M). The candidates kept are the
    nearest to the list's rows; what that costs in agreement with the exact k-th distance:
    `python -m bench.uniqueness_groups COLLECTION --lists 4` (keys `lists_1m`, `lists_4m`)."""
    return m * LIST_ROWS


def list_count(rows: int) -> int:
    """The lists for a collection of `rows`: one per LIST_ROWS rows."""
    return max(1, rows // LIST_ROWS)


def split_centroids(
    store: EmbeddingStore, coarse: np.ndarray, lists: int, seed: int = 0
) -> np.ndarray:
    """About `lists` unit centroids: each coarse list split by a spherical k-means of the rows
    of a sample (TRAIN_ROWS a list) that fall in it, in proportion to their number. Rows are
    read cell by cell, so the driver holds one cell's rows and the sample's ids."""
    rng = np.random.default_rng(seed)
    size = min(store.count, lists * TRAIN_ROWS)
    sample = np.sort(rng.choice(store.count, size=size, replace=False))
    index = open_assigner(assigner(coarse))
    cells = np.empty(size, np.int64)
    for lo in range(0, size, BATCH):
        cells[lo : lo + BATCH] = index.search(read_rows(store, sample[lo : lo + BATCH]), 1)[1][:, 0]
    order = np.argsort(cells, kind="stable")  # ids stay ascending within a cell: file order
    starts, ends = _spans(cells[order], np.arange(len(coarse)))
    wanted = np.maximum(1, np.rint((ends - starts) * lists / size)).astype(np.int64)
    params = SemanticParams(seed=seed, niter=SPLIT_ITERATIONS)
    out = []
    # one thread: a cell's k-means is small (~5k rows at 10M) and OpenMP's threads spent as long
    # waiting at its barriers as working (the plan's CPU at 10M: 134 s on 2 threads, 62 on one)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        for c, (a, b, n) in enumerate(zip(starts.tolist(), ends.tolist(), wanted.tolist())):
            if min(n, b - a) <= 1:  # one list (or no sampled row): the coarse centroid stays
                out.append(coarse[c : c + 1] / max(float(np.linalg.norm(coarse[c])), 1e-12))
                continue
            out.append(kmeans(read_rows(store, sample[order[a:b]]), min(n, b - a), params))
    finally:
        faiss.omp_set_num_threads(threads)
    return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)


def nearest_centroids(centroids: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Each centroid's m nearest centroids (itself among them): exact up to EXACT_NEAR_MAX
    centroids, beyond that through an IVF of sqrt(n) lists probing 16 (all pairs grow with the
    square of the collection)."""
    n, d = centroids.shape
    if n <= EXACT_NEAR_MAX:
        index = faiss.IndexFlatL2(d)
    else:
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, math.isqrt(n), faiss.METRIC_L2)
        index.cp.seed = 0
        index.train(centroids)
        index.nprobe = 16
    index.add(centroids)
    return index.search(centroids, m)


def plan_lists(
    centroids: np.ndarray, m: int, groups: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centroids reordered so that each group's lists are adjacent, each list's m nearest lists
    in that order (its own first), each group's first list and the end): the whole plan."""
    nlist = len(centroids)
    groups = max(1, min(groups, nlist))
    labels = np.zeros(nlist, np.int64)
    if groups > 1:  # nearby lists in one task: their neighbour lists overlap
        km = faiss.Kmeans(
            centroids.shape[1], groups, niter=GROUP_ITERATIONS, seed=seed, min_points_per_centroid=1
        )
        km.train(centroids)
        labels = km.index.search(centroids, 1)[1][:, 0]
    order = np.lexsort((np.arange(nlist), labels))
    ordered = np.ascontiguousarray(centroids[order])
    bounds = np.searchsorted(labels[order], np.unique(labels))
    bounds = np.append(bounds, nlist).astype(np.int64)
    m = min(m, nlist)
    _, near = nearest_centroids(ordered, m)
    own = np.arange(nlist)
    # a list is its own first neighbour even where a centroid repeats
    near = np.where(near == own[:, None], -1, near)
    rest = np.array([r[r >= 0][: m - 1] for r in near]).reshape(nlist, m - 1)
    return ordered, np.concatenate([own[:, None], rest], axis=1).astype(np.int64), bounds


def assigner(centroids: np.ndarray, coarse: np.ndarray | None = None) -> bytes:
    """The index that assigns rows to lists (nearest centroid by L2), serialized: flat, or an
    HNSW graph over many centroids built on one thread so every run builds the same graph. With
    `coarse` (the lists were split from them), an IVF index over the coarse centroids holding
    the lists: a row meets its ASSIGN_PROBES nearest coarse lists' splits, not every list."""
    d = centroids.shape[1]
    if coarse is not None:
        quantizer = faiss.deserialize_index(np.frombuffer(assigner(coarse), np.uint8))
        index = faiss.IndexIVFFlat(quantizer, d, len(coarse), faiss.METRIC_L2)
        index.is_trained = True
        index.add_with_ids(centroids, np.arange(len(centroids), dtype=np.int64))
        index.nprobe = min(ASSIGN_PROBES, len(coarse))
    elif len(centroids) <= HNSW_MIN:
        index = faiss.IndexFlatL2(d)
        index.add(centroids)
    else:
        index = faiss.IndexHNSWFlat(d, 32)
        index.hnsw.efConstruction = 80
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            index.add(centroids)
        finally:
            faiss.omp_set_num_threads(threads)
    return faiss.serialize_index(index).tobytes()


def open_assigner(data: bytes) -> faiss.Index:
    """An index `assigner` serialized, with its search settings."""
    index = faiss.deserialize_index(np.frombuffer(data, np.uint8))
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = 64
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = min(ASSIGN_PROBES, ivf.nlist)
        quantizer = faiss.downcast_index(ivf.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            quantizer.hnsw.efSearch = 64
    return index


class Splits(NamedTuple):
    """The split lists of an IVF assigner, by coarse list: their ids and centroids, and each
    coarse list's ASSIGN_PROBES nearest coarse lists (its own first)."""

    ids: list[np.ndarray]
    vectors: list[np.ndarray]
    near: np.ndarray


def split_lists(index: faiss.Index) -> Splits | None:
    """`index`'s split lists by coarse list (Splits); None when it does not split coarse ones."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return None
    ids, vectors = [], []
    for c in range(ivf.nlist):
        n = ivf.invlists.list_size(c)
        ids.append(faiss.rev_swig_ptr(ivf.invlists.get_ids(c), n).astype(np.int64))
        codes = faiss.rev_swig_ptr(ivf.invlists.get_codes(c), n * ivf.code_size)
        vectors.append(np.frombuffer(codes.tobytes(), np.float32).reshape(n, ivf.d))
    coarse = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    m = min(ASSIGN_PROBES, ivf.nlist)
    near = ivf.quantizer.search(coarse, m)[1]
    own = np.arange(ivf.nlist)
    near = np.where(near == own[:, None], -1, near)  # its own first, even where centroids repeat
    rest = np.array([r[r >= 0][: m - 1] for r in near]).reshape(ivf.nlist, m - 1)
    return Splits(ids, vectors, np.concatenate([own[:, None], rest], axis=1))


def assign_rows(index: faiss.Index, x: np.ndarray, splits: Splits | None) -> np.ndarray:
    """Each row's list (its nearest centroid by L2, as `index` finds it). Where lists were split
    from coarse ones, among the splits of the row's nearest coarse list and of that list's
    ASSIGN_PROBES - 1 nearest: one matrix product for the rows of each coarse list, where an
    IVF search would scan the probed lists row by row (4x the time at 10M rows, and growing)."""
    if splits is None:
        return index.search(x, 1)[1][:, 0]
    ivf = faiss.extract_index_ivf(index)
    top = ivf.quantizer.search(x, 1)[1][:, 0]
    order = np.argsort(top, kind="stable")
    cells = np.unique(top)
    labels = np.empty(len(x), np.int64)
    for c, a, b in zip(cells.tolist(), *_spans(top[order], cells)):
        rows = order[a:b]
        ids = np.concatenate([splits.ids[j] for j in splits.near[c]])
        if not len(ids):  # no split near this coarse list: the index's own search
            labels[rows] = index.search(x[rows], 1)[1][:, 0]
            continue
        vectors = np.concatenate([splits.vectors[j] for j in splits.near[c]])
        dist = np.einsum("ij,ij->i", vectors, vectors)[None, :] - 2.0 * (x[rows] @ vectors.T)
        labels[rows] = ids[np.argmin(dist, axis=1)]
    return labels


def _read(url: str) -> bytes:
    fs, p = url_to_fs(url)
    with fs.open(p, "rb") as fh:
        return fh.read()


def _plan_file(folder: TaskFolder, what: str) -> str:
    return folder.output(PLAN).removesuffix(".parquet") + f"_{what}"


def write_by_lists(folder: TaskFolder, name: str, table: pa.Table, starts: np.ndarray) -> None:
    """`table` (sorted by list) with a row group starting at each of `starts`, and each row
    group's first list in the schema metadata, where `_rows_of_lists` finds them in the footer."""
    first = table.column(LIST).to_numpy()[starts].astype(np.int64).tobytes().hex()
    meta = table.replace_schema_metadata({FIRST_LISTS: first})
    folder.write(name, meta, row_groups=np.asarray(starts).tolist())


def assign_task(
    folder: TaskFolder, name: str, collection: str, modality: str, pos: int
) -> dict[str, Any]:
    """One part's rows with their list (list, id, key), sorted by list; returns rows per list."""
    t0 = time.process_time()
    store = EmbeddingStore.open(collection, modality)
    start, rows, keys = part_keys(collection, store, pos)
    index = open_assigner(_read(_plan_file(folder, "assign")))
    splits = split_lists(index)
    labels = np.empty(rows, np.int64)
    arr = store.arrays[pos]
    for lo in range(0, rows, BATCH):
        x = np.ascontiguousarray(arr[lo : lo + BATCH], dtype=np.float32)
        labels[lo : lo + len(x)] = assign_rows(index, x, splits)
    order = np.argsort(labels, kind="stable")
    bounds = np.asarray(folder.result(PLAN)["bounds"], np.int64)
    sorted_labels = labels[order]
    # one row group per group task's lists: a task reads only its own and its neighbours'
    starts = np.unique(np.searchsorted(sorted_labels, bounds[:-1]))
    starts = starts[starts < rows]
    table = pa.table(
        {
            LIST: pa.array(sorted_labels, pa.int64()),
            S.ID: pa.array(start + order, pa.int64()),
            S.KEY: keys.cast(pa.string()).take(pa.array(order)),
        }
    )
    write_by_lists(folder, name, table, starts)
    return {
        "rows": rows,
        "sizes": np.bincount(labels, minlength=index.ntotal).tolist(),
        "cpu_seconds": {"assign": round(time.process_time() - t0, 3)},
    }


def top_k(
    q: np.ndarray, q_ids: np.ndarray, x: np.ndarray, x_ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's k most similar rows of `x` other than itself: (positions in x, cosines),
    each (len(q), k), one matrix product per block of BLOCK rows of x; -1 / -inf where x holds
    fewer than k others."""
    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_i = np.full((len(q), k), -1, np.int64)
    rows = np.arange(len(q))[:, None]
    for lo in range(0, len(x), BLOCK):
        s = q @ x[lo : lo + BLOCK].T
        s[q_ids[:, None] == x_ids[None, lo : lo + BLOCK]] = -np.inf  # never one's own neighbour
        idx = np.broadcast_to(np.arange(lo, lo + s.shape[1]), s.shape)
        s, idx = np.concatenate([best_s, s], axis=1), np.concatenate([best_i, idx], axis=1)
        keep = np.argpartition(-s, k - 1, axis=1)[:, :k]
        best_s, best_i = s[rows, keep], idx[rows, keep]
    best_i[~np.isfinite(best_s)] = -1
    return best_i, best_s


def group_task(
    folder: TaskFolder,
    name: str,
    collection: str,
    modality: str,
    k: int,
    first: int,
    end: int,
    parts: list[str],
) -> dict[str, Any]:
    """Lists first..end-1: each row's k-th distance among the rows of its list's neighbour lists
    (key, id, kth_distance); returns the rows and how many had fewer than k candidates."""
    t0 = time.process_time()
    near = np.load(io.BytesIO(_read(_plan_file(folder, "near.npy"))))[first:end]
    needed = np.unique(near)
    table = pa.concat_tables([_rows_of_lists(folder.output(p), needed) for p in parts])
    table = table.take(pc.sort_indices(table, [(LIST, "ascending"), (S.ID, "ascending")]))
    lists, ids = table.column(LIST).to_numpy(), table.column(S.ID).to_numpy()
    t1 = time.process_time()
    x = read_rows(EmbeddingStore.open(collection, modality), ids)
    t2 = time.process_time()
    lo = np.searchsorted(lists, np.arange(first, end + 1))
    at = {int(c): (int(a), int(b)) for c, a, b in zip(needed, *_spans(lists, needed))}
    kth = np.full(lo[-1] - lo[0], np.nan, np.float32)
    short = pairs = 0
    cap = candidate_cap(near.shape[1])
    for i in range(end - first):
        if lo[i] == lo[i + 1]:
            continue
        spans = [at[int(c)] for c in near[i]]
        cand = np.concatenate([np.arange(a, b) for a, b in spans])
        q_rows = np.arange(lo[i], lo[i + 1])
        if len(cand) > cap:  # the candidates nearest the list's rows: bounded work per row
            centre = x[q_rows].sum(axis=0)
            # scored list by list on slices: gathering every candidate of a crowded
            # neighbourhood cost more than the search at 4M rows
            central = np.concatenate([x[a:b] @ centre for a, b in spans])
            cand = cand[np.sort(np.argpartition(-central, cap - 1)[:cap])]
        pairs += len(q_rows) * len(cand)
        pos, sims = top_k(x[q_rows], ids[q_rows], x[cand], ids[cand], k)
        kth_pos = pos[np.arange(len(pos)), np.argmin(sims, axis=1)]
        found = (pos >= 0).all(axis=1)
        short += int((~found).sum())
        # the k-th cosine recomputed row by row: the same value on any BLAS thread count
        exact = np.einsum("qd,qd->q", x[q_rows[found]], x[cand[kth_pos[found]]])
        kth[q_rows[found] - lo[0]] = np.maximum(1.0 - exact, 0.0)  # float16 copies exceed 1
    t3 = time.process_time()
    mine = slice(int(lo[0]), int(lo[-1]))
    folder.write(
        name,
        pa.table(
            {
                S.KEY: table.column(S.KEY).slice(mine.start, mine.stop - mine.start),
                S.ID: pa.array(ids[mine], pa.int64()),
                S.KTH_DISTANCE: pa.array(kth, pa.float32()),
            }
        ),
    )
    cpu = {"lists": t1 - t0, "rows": t2 - t1, "search": t3 - t2, "write": time.process_time() - t3}
    return {
        "rows": int(len(kth)),
        "fewer_than_k": short,
        "pairs": pairs,
        "cpu_seconds": {k: round(v, 3) for k, v in cpu.items()},
    }


#: each assign output's parsed footer and row groups' first lists, by URL with its signature:
#: a worker runs many group tasks and each reads every part's output, so parsing the footers
#: again in each task grew with parts x tasks (at 10M rows a quarter of the reading's CPU)
_FOOTERS: dict[str, tuple[tuple | None, Any, np.ndarray]] = {}
#: footers kept per process (an assign output's footer is ~100 kB at 300 row groups)
_FOOTERS_MAX = 4096


def _footer(url: str, fh: Any) -> tuple[Any, np.ndarray]:
    """(parquet metadata, each row group's first list) of the assign output `url`, open as
    `fh`, parsed once per process while the file stays the same."""
    signature = file_signature(url)
    got = _FOOTERS.get(url)
    if got is not None and got[0] == signature:
        return got[1], got[2]
    pf = pq.ParquetFile(fh)
    meta = pf.schema_arrow.metadata or {}
    if FIRST_LISTS.encode() not in meta:
        raise CollectionError(f"{url}: no {FIRST_LISTS} metadata; rerun the stage")
    first = np.frombuffer(bytes.fromhex(meta[FIRST_LISTS.encode()].decode()), np.int64)
    if len(_FOOTERS) >= _FOOTERS_MAX:
        _FOOTERS.clear()
    _FOOTERS[url] = (signature, pf.metadata, first)
    return pf.metadata, first


def _rows_of_lists(url: str, needed: np.ndarray) -> pa.Table:
    """The (list, id, key) rows of an assign task's output whose list is in `needed` (sorted),
    reading only the row groups whose list range holds one: the whole output holds N rows. The
    row groups' first lists come from the footer's metadata, not one statistics object per row
    group: at 10M rows, 300 group tasks each looking at 100 files of 300 row groups had spent
    85 s of CPU there."""
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as fh:
        metadata, first = _footer(url, fh)
        pf = pq.ParquetFile(fh, metadata=metadata)
        # row group r holds lists first[r] up to first[r + 1] (row groups end between lists)
        end = np.append(first[1:], np.iinfo(np.int64).max)
        at = np.minimum(np.searchsorted(needed, first), len(needed) - 1)
        wanted = np.nonzero((needed[at] >= first) & (needed[at] < end))[0]
        table = (
            pf.read_row_groups(wanted.tolist()) if len(wanted) else pf.schema_arrow.empty_table()
        )
    return table.filter(pc.is_in(table.column(LIST), pa.array(needed, pa.int64())))


def _spans(lists: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each wanted list's rows start and end in `lists` (sorted)."""
    return np.searchsorted(lists, wanted, "left"), np.searchsorted(lists, wanted, "right")


def _centroids(
    collection: str, modality: str, store: EmbeddingStore
) -> tuple[np.ndarray, str, np.ndarray | None]:
    """The lists' centroids (module doc), where they came from, and the coarse centroids they
    were split from (None when not split)."""
    lists = list_count(store.count)
    coarse, source = index_centroids(collection, modality), "index"
    if coarse is None:
        source = "kmeans"
        log.info("%s: no IVF index; k-means of the lists on a sample", collection)
        coarse = sample_centroids(store, min(lists, max(1, math.isqrt(ASSIGN_PROBES * lists))))
    if len(coarse) >= lists:
        return coarse, source, None
    log.info("%s: %d %s lists split into about %d", collection, len(coarse), source, lists)
    return split_centroids(store, coarse, lists), f"{source}+split", coarse


def lists_job(
    collection: str,
    k: int,
    modality: str,
    path: str,
    scheduler: str | None = None,
    workers: int | None = None,
    m: int = NEIGHBOUR_LISTS,
    task_rows: int = TASK_ROWS,
) -> dict[str, Any]:
    """Write `path` (uniqueness.parquet) by lists (module doc); return counts for the report."""
    if m < 1 or task_rows < 1:
        raise ValueError(f"neighbour lists and task rows must be at least 1, got {m}, {task_rows}")
    check_parts(collection, modality)
    store = open_store(collection, modality)
    layout = S.CollectionLayout(collection)
    params = {
        "k": k,
        "modality": modality,
        "method": "lists",
        "neighbour_lists": m,
        "task_rows": task_rows,
        "candidate_cap": candidate_cap(m),
        "row_group_lists": FIRST_LISTS,
        "index": file_signature(layout.index(modality)),
        **part_params(collection, np.diff(store.offsets)),
    }
    folder = task_folder(path, params)
    plan = folder.result(PLAN)
    if plan is None:
        t0 = time.process_time()
        centroids, source, coarse = _centroids(collection, modality, store)
        groups = math.ceil(store.count / task_rows)
        ordered, near, bounds = plan_lists(centroids, m, groups)
        buf = io.BytesIO()
        np.save(buf, near)
        write_bytes(_plan_file(folder, "near.npy"), buf.getvalue())
        write_bytes(_plan_file(folder, "assign"), assigner(ordered, coarse))
        plan = folder.finish(
            PLAN,
            {
                "lists": len(ordered),
                "centroids": source,
                "bounds": bounds.tolist(),
                "cpu_seconds": round(time.process_time() - t0, 1),
            },
        )
    bounds = plan["bounds"]
    parts = [f"assign_{p:05d}" for p in store.parts]
    with Runner(scheduler, workers) as runner:
        runner_args = [(collection, modality, pos) for pos in range(len(parts))]
        assigned, ran = runner.run(assign_task, folder, parts, runner_args)
        names = [f"group_{g:05d}" for g in range(len(bounds) - 1)]
        args = [
            (collection, modality, k, bounds[g], bounds[g + 1], parts)
            for g in range(len(bounds) - 1)
        ]
        results, ran_groups = runner.run(group_task, folder, names, args)
    # where the workers' time went (process CPU seconds of each task, summed): the plan's cost
    # ratios at 1M and 10M rows come from these
    cpu: dict[str, float] = {"plan": plan.get("cpu_seconds", 0.0)}
    for r in [*assigned, *results]:
        for key, value in r.get("cpu_seconds", {}).items():
            cpu[key] = round(cpu.get(key, 0.0) + value, 1)
    done = finish_job(folder, names, store.count, path)
    per_row = sum(r.get("pairs", 0) for r in results) / max(store.count, 1)
    log.info(
        "%s: uniqueness by %d lists (%s centroids), %d neighbour lists, %d group tasks; "
        "%.0f candidates a row; CPU seconds of the tasks by phase: %s",
        collection,
        plan["lists"],
        plan["centroids"],
        m,
        len(names),
        per_row,
        cpu,
    )
    return {
        **done,
        "method": "lists",
        "lists": plan["lists"],
        "centroids": plan["centroids"],
        "neighbour_lists": min(m, plan["lists"]),
        "fewer_than_k_candidates": sum(r["fewer_than_k"] for r in results),
        # the search's work per row (at most candidate_cap): what its CPU grows with
        "candidates_per_row": round(per_row, 1),
        "tasks": len(parts) + len(names),
        "tasks_run": ran + ran_groups,
        "task_cpu_seconds": cpu,
    }
