"""Build the collection's FAISS indices: choose, train on a sample, add part by part, tune,
and write `indices/{modality}.index` + `{modality}.json` atomically, the json last.

    python -m indices.build COLLECTION [--max-index-memory 4G] [--max-query-ms 10]
                            [--modality image,text] [--index-key KEY] [--target-recall 0.95]
                            [--workers N | --scheduler ADDR]

COLLECTION is a folder or any fsspec URL (s3://bucket/coll, ...). A remote collection's
embeddings of the modality are copied once into a local temporary folder (under $TMPDIR: room
for them is needed), the index is built there as for a local one, then uploaded into the
collection's indices/ folder. Its latencies are measured on that copy; a searcher of the remote
collection re-ranks by range reads of the store.

With --workers or --scheduler, or above DISTRIBUTED_MIN vectors, an IVF index is built the
distributed way (`indices.build_parts`: train once, one Dask task per group of parts, merged
into lists on disk that search memory-maps); smaller collections are added in this process.
"""

from __future__ import annotations

import argparse
import logging
import os
import posixpath
import re
import shutil
import sys
import tempfile
import time
from typing import Any

import faiss
import numpy as np

from collection import schema as S
from collection.cluster_options import add_cluster_options
from collection.embeddings import EmbeddingStore
from collection.parts import CollectionError, complete_parts
from collection.storage import (
    REMOTE_ERRORS,
    atomic_open,
    atomic_path,
    is_local,
    url_to_fs,
    write_json,
)
from indices.local import index_files
from indices.merge import ivfdata_path
from indices.rows import RowStore
from indices.select import choose_index, estimate_bytes, parse_bytes
from indices.tune import exact_topk, tune
from models.runtime import setup_logging

log = logging.getLogger(__name__)

#: above this many vectors an IVF index is built on Dask and merged on disk even without
#: --workers: the single-process build holds the whole index in RAM while it adds
DISTRIBUTED_MIN = 2_000_000
N_QUERIES = 200
#: bytes per read while uploading a remote collection's index
UPLOAD_CHUNK = 16 * 2**20


def load_index(path: str, mmap: bool = True) -> Any:
    """Read an index; memory-mapped (read-only) where faiss supports it for that type. An index
    whose lists are on disk (`indices.merge`, the file beside it) maps that file instead."""
    if not os.path.exists(path):
        raise CollectionError(f"{path}: no index; run `python -m indices.build` first")
    if os.path.exists(ivfdata_path(path)):  # IO_FLAG_MMAP crashes faiss on on-disk lists
        return faiss.read_index(path, faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
    if mmap:
        try:
            return faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError as exc:
            log.warning("%s: memory-mapped read unsupported (%s); loading into RAM", path, exc)
    return faiss.read_index(path)


def open_index(root: str, modality: str, mmap: bool = True) -> tuple[Any, dict[str, Any]]:
    """(index, its json) of a collection on any URL: a remote index is read from a local copy
    (`indices.local.index_files`), so it is memory-mapped like a local one."""
    path, doc = index_files(root, modality)
    if doc.get("on_disk") and not is_local(root):
        raise CollectionError(
            f"{root}: its {modality} index keeps its lists on disk; serving it from a remote "
            "collection is not supported yet (build without --workers)"
        )
    return load_index(path, mmap), doc


def write_index(index: Any, root: str, modality: str, work: str | None = None) -> int:
    """Write `index` as `modality`'s index of `root` (a folder or any URL); its size in bytes.

    The modality's json goes first, and the caller writes it again last: an index without its
    json is incomplete, so a build cut short never looks complete. A remote index is written in
    a local folder (`work`, else a temporary one), then uploaded under a temporary name and
    renamed into place.
    """
    layout = S.CollectionLayout(root)
    url = layout.index(modality)
    try:
        fs, json_path = url_to_fs(layout.index_json(modality))
        if fs.exists(json_path):
            fs.rm(json_path)
        if is_local(url):
            path = url_to_fs(url)[1]
            with atomic_path(path) as tmp:
                faiss.write_index(index, tmp)
            return os.path.getsize(path)
        with tempfile.TemporaryDirectory(prefix="sieve-index-", dir=work) as folder:
            tmp = os.path.join(folder, posixpath.basename(url))
            faiss.write_index(index, tmp)
            with open(tmp, "rb") as src, atomic_open(url) as dst:
                shutil.copyfileobj(src, dst, UPLOAD_CHUNK)
            return os.path.getsize(tmp)
    except REMOTE_ERRORS as exc:  # not a CollectionError: `build` skips those per modality
        raise OSError(f"{url}: cannot write the index: {type(exc).__name__}: {exc}") from None


def _queries(
    root: str, modality: str, store: EmbeddingStore, n: int, seed: int
) -> tuple[np.ndarray, str]:
    """Held-out queries: the other modality's embeddings when present (text->image is what
    serving sees), else rows of this modality sampled with a different seed."""
    other = S.MODALITY_TEXT if modality == S.MODALITY_IMAGE else S.MODALITY_IMAGE
    try:
        o = EmbeddingStore.open(root, other)
        if o.count and o.dim == store.dim:
            return o.sample(n, seed + 1)[1], f"{other} embeddings ({other}->{modality} queries)"
    except CollectionError:
        pass
    return store.sample(n, seed + 1)[1], f"{modality} embeddings sampled from the collection"


def build_one(
    root: str,
    modality: str,
    max_index_memory: int | str = "4G",
    max_query_ms: float = 10.0,
    index_key: str | None = None,
    target_recall: float = 0.95,
    seed: int = 0,
    n_queries: int = N_QUERIES,
    cluster: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build, tune and atomically write one modality's index; returns its json record.
    `cluster` ({"client", "scheduler", "workers"}, any of them) asks for the distributed build."""
    with tempfile.TemporaryDirectory(prefix="sieve-build-") as work:
        return _build_one(
            root,
            modality,
            work,
            max_index_memory,
            max_query_ms,
            index_key,
            target_recall,
            seed,
            n_queries,
            cluster,
        )


def _build_one(
    root: str,
    modality: str,
    work: str,
    max_index_memory: int | str,
    max_query_ms: float,
    index_key: str | None,
    target_recall: float,
    seed: int,
    n_queries: int,
    cluster: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`build_one` with a local folder to work in: a remote collection's embeddings are copied
    there first (training, adding and tuning read every row several times)."""
    t0 = time.perf_counter()
    store = EmbeddingStore.open(root, modality)
    remote = not is_local(root)
    if remote:
        store = store.to_local(os.path.join(work, modality))
        log.info("%s: copied %d embeddings to %s", modality, store.count, work)
    n, dim = store.count, store.dim
    if n == 0:
        raise CollectionError(f"{root}: no {modality} embeddings to index")
    # Dask is behind build_parts: imported here so that search's import of open_index stays light
    from indices.build_parts import build_distributed, train_index

    budget = parse_bytes(max_index_memory)
    # a small collection or a flat / graph index is added in this process: the whole index
    # is in RAM anyway, and starting a cluster would cost more than the adding
    asked = bool(cluster) and not remote  # a remote collection's copy is local to this process
    distributed = asked or (not remote and n > DISTRIBUTED_MIN)
    choice = choose_index(n, dim, budget, ivf=distributed)
    key = index_key or choice.index_key
    distributed = asked or (distributed and "IVF" in key)
    rerank = choice.rerank if index_key is None else "PQ" in key
    log.info("%s: %d x %d, budget %d B -> %s (%s)", modality, n, dim, budget, key, choice.reason)
    m = re.search(r"IVF(\d+)", key)
    nlist = int(m.group(1)) if m else None
    t_train = time.perf_counter()
    layout = S.CollectionLayout(root)
    path = layout.index(modality)
    extra: dict[str, Any] = {}
    if distributed:
        local_path, extra = build_distributed(store, key, nlist, seed, **(cluster or {}))
        t_add = t_tune = time.perf_counter()  # training and adding overlap: one figure
        index = load_index(local_path)
        size = os.path.getsize(local_path)
    else:
        index = train_index(store, key, nlist, seed)
        t_add = time.perf_counter()
        for _start, x in store.iter_parts():  # one part in memory at a time
            index.add(x)
        t_tune = time.perf_counter()
    queries, qsource = _queries(root, modality, store, n_queries, seed)
    truth = exact_topk(store, queries, 10)
    params, measured, table = tune(
        index, key, nlist, rerank, store, queries, truth, max_query_ms, target_recall
    )
    if not distributed:
        size = write_index(index, root, modality, work)
        if not remote and os.path.exists(ivfdata_path(url_to_fs(path)[1])):
            os.remove(ivfdata_path(url_to_fs(path)[1]))  # lists of an earlier on-disk build
    depth = params.get("rerank_k", 0)
    doc = {
        "modality": modality,
        "index_key": key,
        "metric": "inner_product",
        "count": n,
        "dim": dim,
        "params": params,
        "rerank": bool(depth),
        "rerank_source": (
            f"{modality} float16 embeddings ({'range reads' if remote else 'mmap'})"
            if depth
            else None
        ),
        "recall_at_10": measured["recall_at_10"],
        "p50_ms": measured["p50_ms"],
        "p99_ms": measured["p99_ms"],
        "recall_queries": {
            "n": len(queries),
            "source": qsource,
            "truth": "exact inner product over every vector",
        },
        "index_bytes": size,
        "estimated_bytes": estimate_bytes(key, n, dim),
        "flat_bytes": n * dim * 4,
        "memory_ratio_vs_flat": (size + extra.get("ivfdata_bytes", 0)) / (n * dim * 4),
        "bytes_read_per_query": depth * dim * np.dtype(S.EMB_DTYPE).itemsize,
        "max_index_memory": budget,
        "max_query_ms": max_query_ms,
        "target_recall": target_recall,
        "reason": choice.reason if index_key is None else "index key given by the caller",
        "train_seconds": t_add - t_train,
        "add_seconds": t_tune - t_add,
        "tune_seconds": time.perf_counter() - t_tune,
        "build_seconds": time.perf_counter() - t0,
        "parts": store.parts,
        "faiss_version": faiss.__version__,
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sweep": table,
        **extra,
    }
    write_json(layout.index_json(modality), doc)
    log.info(
        "%s: wrote %s (%d B, recall@10 %.3f, p99 %.2f ms)",
        modality,
        path,
        size,
        doc["recall_at_10"],
        doc["p99_ms"],
    )
    return doc


def build(
    collection: str,
    max_index_memory: str = "4G",
    max_query_ms: float = 10.0,
    modality: str = "image,text",
    index_key: str | None = None,
    target_recall: float = 0.95,
    seed: int = 0,
    workers: int | None = None,
    scheduler: str | None = None,
    client: Any = None,
) -> dict[str, dict[str, Any]]:
    """Build every requested modality's index; a modality without embeddings is skipped
    unless it was the only one asked for. `workers`, `scheduler` or a Dask `client` ask for
    the distributed build (one cluster serves both modalities)."""
    wanted = [m.strip() for m in modality.split(",") if m.strip()]
    for m in wanted:
        if m not in S.MODALITIES:
            raise ValueError(f"--modality: unknown {m!r}; expected {','.join(S.MODALITIES)}")
    complete_parts(collection)  # a collection that cannot be read says why, whatever the modality
    if (workers or scheduler or client) and not is_local(collection):
        raise ValueError(
            f"{collection}: the distributed build needs a local collection (a path every worker "
            "reads); leave out --workers/--scheduler to build from a local copy"
        )
    session = None
    if client is None and (workers or scheduler):
        # Dask: imported only when a distributed build is asked for, so --help answers at once
        from collection.cluster import open_cluster
        from indices.build_parts import BUILD_WORKER_ENV

        session = open_cluster(scheduler, workers or 1, worker_env=BUILD_WORKER_ENV)
        client = session.client
    cluster = {"client": client} if client is not None else None
    out = {}
    try:
        for m in wanted:
            try:
                out[m] = build_one(
                    collection,
                    m,
                    max_index_memory,
                    max_query_ms,
                    index_key,
                    target_recall,
                    seed,
                    cluster=cluster,
                )
            except CollectionError as exc:
                if len(wanted) == 1:
                    raise
                log.warning("skipping %s: %s", m, exc)
    finally:
        if session is not None:
            session.close()
    if not out:
        raise CollectionError(f"{collection}: nothing to index for {modality}")
    # the searcher's memory-mapped rows, written now rather than at its first start
    RowStore.open(collection)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m indices.build", description=__doc__.splitlines()[0])
    p.add_argument("collection")
    p.add_argument("--max-index-memory", default="4G", help="resident index budget, e.g. 4G, 100M")
    p.add_argument(
        "--max-query-ms", type=float, default=10.0, help="p99 single-query latency budget"
    )
    p.add_argument("--modality", default="image,text")
    p.add_argument("--index-key", default=None, help="force a faiss index_factory key")
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    where = p.add_mutually_exclusive_group()
    add_cluster_options(where, "distributed build, N local workers")
    a = p.parse_args(argv)
    setup_logging()
    try:
        docs = build(
            a.collection,
            a.max_index_memory,
            a.max_query_ms,
            a.modality,
            a.index_key,
            a.target_recall,
            a.seed,
            a.workers,
            a.scheduler,
        )
    except (ValueError, OSError, RuntimeError) as exc:  # CollectionError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    for m, d in docs.items():
        print(
            f"{m}: {d['index_key']} params={d['params']} recall@10={d['recall_at_10']:.3f} "
            f"p99={d['p99_ms']:.2f}ms size={d['index_bytes']}B "
            f"({d['memory_ratio_vs_flat']:.3f} of flat)"
        )


if __name__ == "__main__":
    main()
