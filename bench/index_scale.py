"""The 10M index benchmark of issue 22 (`python -m bench.index --scale`): results key `scale_10m`.

On a generated 10M x 512 collection (`bench.synthetic_scale`, kept in --scale-root with its
index: other benchmarks read it), with local Dask workers: the distributed build's seconds and
the peak RSS of the driver and of the worker processes (sampled while it runs), recall@10 of the
tuned index (with its exact re-rank) against exact search on 1,000 held-out queries, single-query
p50/p99, the server under `bench.server`'s load generator, the `knn` clause's returned / expected
rows for k x filter, and the same build at 100k and 1M (the slope) with the 2-workers-vs-1
speedup on 1M. Every step merges its figures into the results file as it finishes, so a run cut
short keeps what it measured.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from typing import Any, Callable

from bench.common import RESULTS_DIR, rss_mb, write_results
from bench.synthetic_scale import describe, held_out_queries, write_scale_collection
from collection import schema as S
from collection.embeddings import EmbeddingStore
from collection.storage import read_json
from indices import rows as row_files
from indices.build import build_one, load_index
from indices.build_parts import build_distributed, parts_dir, trained_index
from indices.rows import RowStore
from indices.tune import (
    ann_search,
    exact_topk,
    recall_at,
    search_latency_ms,
    set_search_params,
)

log = logging.getLogger("bench.index_scale")

KEY = "scale_10m"
N_QUERIES = 1000
#: queries the build tunes nprobe and the re-rank depth on (its exact answers are a full scan)
TUNE_QUERIES = 100
#: k x filter grid of the knn clause (a filter on the row's position in its part keeps a share)
KNN_KS = (100, 10_000, 100_000)
KNN_SHARES = (0.01, 0.10, 0.50)


class RssSampler:
    """Peak RSS of this process and of every process under it (the Dask nanny's workers),
    sampled from /proc every `every` seconds while it runs (a `with` block). RSS counts the
    pages of memory-mapped embeddings a process has touched (page cache the kernel reclaims at
    will), so the anonymous part (RssAnon: what the process itself allocated) is kept too."""

    def __init__(self, every: float = 0.5) -> None:
        self.every = every
        self.driver = 0.0
        self.driver_anon = 0.0
        self.workers: dict[int, float] = {}
        self.workers_anon: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            self.driver = max(self.driver, rss_mb())
            self.driver_anon = max(self.driver_anon, rss_mb(field="RssAnon"))
            for pid in _descendants(me):
                for field, peaks in (("VmRSS", self.workers), ("RssAnon", self.workers_anon)):
                    value = rss_mb(pid, field)
                    if value == value:  # NaN: the process has just gone
                        peaks[pid] = max(peaks.get(pid, 0.0), value)
            self._stop.wait(self.every)

    def figures(self) -> dict[str, Any]:
        return {
            "driver_peak_rss_mb": self.driver,
            "worker_peak_rss_mb": max(self.workers.values(), default=float("nan")),
            "driver_peak_anon_mb": self.driver_anon,
            "worker_peak_anon_mb": max(self.workers_anon.values(), default=float("nan")),
            "child_processes_sampled": len(self.workers),
        }


def _descendants(pid: int) -> list[int]:
    """Every process whose parent chain reaches pid (from /proc's stat files)."""
    parent: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as fh:
                    parent[int(name)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, frontier = [], {pid}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier}
        out.extend(frontier)
    return out


def _save(section: dict[str, Any]) -> None:
    """Merge `section` into bench/results/index.json's scale_10m, keeping the figures of steps
    this run did not repeat."""
    old = RESULTS_DIR / "index.json"
    merged = json.loads(old.read_text()).get(KEY, {}) if old.exists() else {}
    merged.update(section)
    path = write_results("index", {KEY: merged}, merge=True)
    log.info("%s: %s updated (%s)", path, KEY, ", ".join(sorted(section)))


def _step(out: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]]) -> None:
    """Run one measurement, record its figures (or why it failed) and save at once."""
    t = time.perf_counter()
    try:
        out.update(fn())
    except Exception as exc:  # a benchmark step that fails is reported, the others still run
        log.exception("%s failed", name)
        out.setdefault("failed", {})[name] = f"{type(exc).__name__}: {exc}"
    out.setdefault("step_seconds", {})[name] = time.perf_counter() - t
    out["load_average_now"] = list(os.getloadavg())
    _save(out)


def build_10m(root: str, workers: int, budget: str, max_query_ms: float = 10.0) -> dict[str, Any]:
    """The distributed build of the image index, driver and worker RSS sampled meanwhile.
    From nothing: a rerun would otherwise reuse the part indices an earlier build left."""
    shutil.rmtree(parts_dir(root, S.MODALITY_IMAGE), ignore_errors=True)
    with RssSampler() as rss:
        doc = build_one(
            root,
            S.MODALITY_IMAGE,
            budget,
            max_query_ms,
            n_queries=TUNE_QUERIES,
            cluster={"workers": workers},
        )
    return {
        "build_seconds": doc["build_seconds"],
        "train_and_add_seconds": doc["train_seconds"],
        "tune_seconds": doc["tune_seconds"],
        "index_key": doc["index_key"],
        "params": doc["params"],
        "memory_ratio_vs_flat": doc["memory_ratio_vs_flat"],
        "index_bytes": doc["index_bytes"],
        "ivfdata_bytes": doc.get("ivfdata_bytes"),
        "part_indices": doc.get("part_indices"),
        "tuned_recall_at_10": doc["recall_at_10"],
        "tune_queries": TUNE_QUERIES,
        "workers": workers,
        "max_index_memory": budget,
        "tune_max_query_ms": max_query_ms,
        **rss.figures(),
    }


SWEEP_DEPTHS = (400, 1000, 2000, 4000)  # re-rank depths measured beside the tuned one
SWEEP_QUERIES = 200


def quality(root: str, n_queries: int = N_QUERIES) -> dict[str, Any]:
    """recall@10 against exact search, and single-query latency, of the built index as search
    uses it (memory-mapped lists, tuned nprobe, exact re-rank of its candidates)."""
    store = EmbeddingStore.open(root, S.MODALITY_IMAGE)
    path = S.CollectionLayout(root).index(S.MODALITY_IMAGE)
    doc = read_json(S.CollectionLayout(root).index_json(S.MODALITY_IMAGE))
    index = load_index(path)
    set_search_params(index, doc["params"])
    depth = int(doc["params"].get("rerank_k", 0))
    q = held_out_queries(n_queries, store.dim)
    t = time.perf_counter()
    truth = exact_topk(store, q, 10)
    truth_s = time.perf_counter() - t
    _, found = ann_search(index, store, q, 10, depth, mapped=False)
    lat = search_latency_ms(index, store, q, 10, depth, n_queries)  # as the tuner measures
    # what deeper exact re-ranks would buy at the tuned nprobe: says whether the probe or the
    # codes lose the true neighbours (the tuner stops at indices.tune.RERANK_DEPTHS)
    sweep = []
    for deeper in SWEEP_DEPTHS:
        t = time.perf_counter()
        _, got = ann_search(index, store, q[:SWEEP_QUERIES], 10, deeper)
        ms = (time.perf_counter() - t) / SWEEP_QUERIES * 1e3
        sweep.append(
            {
                "rerank_k": deeper,
                "recall_at_10": recall_at(got, truth[:SWEEP_QUERIES], 10),
                "mean_ms": ms,
            }
        )
    return {
        "recall_at_10": recall_at(found, truth, 10),
        "recall_queries": n_queries,
        **lat,
        "exact_truth_seconds": truth_s,
        "rerank_sweep": {
            "queries": SWEEP_QUERIES,
            "nprobe": doc["params"].get("nprobe"),
            "rows": sweep,
        },
    }


def rows(root: str) -> dict[str, Any]:
    """The searcher's row files (written once; what the server maps at its start)."""
    t = time.perf_counter()
    store = RowStore.open(root)
    files = {row_files.group_name(n // row_files.PARTS_PER_FILE) for n in store.parts}
    return {"rows_files_seconds": time.perf_counter() - t, "rows_files": len(files)}


def server(root: str, seconds: float) -> dict[str, Any]:
    """`bench.server`'s load generator against `python -m indices.serve` on the 10M index."""
    from bench.server import CACHE, caption_pool, load_run, zipf_draws  # torch: this step only

    queries = zipf_draws(caption_pool(2000), 200_000, 1.0)
    cached = load_run(root, queries, "fp32", CACHE, 16, seconds, 5.0, 10)
    nocache = load_run(root, queries, "fp32", "0", 16, seconds, 5.0, 10)
    return {
        "server": {
            "qps": cached["qps"],
            "p99_ms": cached["p99_ms"],
            "p50_ms": cached["p50_ms"],
            "errors": cached["errors"],
            "cache_hit_rate": cached["cache_hit_rate"],
            "no_cache": nocache,
            "how": "bench.server.load_run: 16 clients, Zipf(1.0) over 2,000 captions, "
            "open_clip ViT-B-32 (random weights) text tower, server on core 0 one thread",
        }
    }


def knn_grid(root: str, per_part: int) -> dict[str, Any]:
    """returned / expected rows of a subset spec's knn clause after a where clause, per k and
    the share of rows the where keeps, and the seconds each resolve took."""
    from curation.resolve import resolve  # the curation stack: this step only

    q = held_out_queries(1, 512)[0]
    count = int(EmbeddingStore.open(root, S.MODALITY_IMAGE).count)
    cells = []
    for share in KNN_SHARES:
        where = f"{S.ROW} < {int(round(share * per_part))}"
        t = time.perf_counter()
        kept = len(resolve(root, {"where": where}).ids)
        where_s = time.perf_counter() - t
        for k in KNN_KS:
            t = time.perf_counter()
            got = len(resolve(root, {"where": where, "knn": {"embedding": q.tolist(), "k": k}}).ids)
            cell = {
                "k": k,
                "filter": where,
                "kept_rows": kept,
                "kept_share": kept / count,
                "returned": got,
                "expected": min(k, kept),
                "exact_fraction": got / min(k, kept),
                "seconds": time.perf_counter() - t,
                "where_only_seconds": where_s,
            }
            cells.append(cell)
            log.info("knn %s", cell)
    return {
        "knn_clause": cells,
        "knn_clause_exact_fraction": min(c["exact_fraction"] for c in cells),
    }


def ladder(work: str, sizes: tuple[int, ...], workers: int, budget: str) -> dict[str, Any]:
    """The same distributed build at smaller sizes (time and peak memory: the slope), and on the
    largest the adding and merging again with 1 then `workers` workers, the trained index
    reused: `speedup_2_workers_vs_1`. The collections are removed afterwards."""
    out: dict[str, Any] = {"sizes": {}}
    for n in sizes:
        root = os.path.join(work, f"n{n}")
        try:
            write_scale_collection(root, n, 20, 512, workers)
            fig = build_10m(root, workers, budget)
            out["sizes"][str(n)] = {k: fig[k] for k in LADDER_FIGURES}
            _save({"ladder": out})
            if n == max(sizes):
                out.update(speedup(root, fig["index_key"], workers))
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return {"ladder": out, "speedup_2_workers_vs_1": out.get("speedup_2_workers_vs_1")}


LADDER_FIGURES = (
    "build_seconds",
    "index_key",
    "driver_peak_rss_mb",
    "worker_peak_rss_mb",
    "memory_ratio_vs_flat",
    "tuned_recall_at_10",
)


def speedup(root: str, key: str, workers: int, seed: int = 0) -> dict[str, Any]:
    """Adding and merging the built collection's part indices again with 1, then `workers`
    workers (the trained index on disk is reused by both)."""
    store = EmbeddingStore.open(root, S.MODALITY_IMAGE)
    nlist = int(re.search(r"IVF(\d+)", key).group(1))
    folder = parts_dir(root, S.MODALITY_IMAGE)
    trained_index(store, key, nlist, seed, folder)
    times = {}
    for w in (1, workers):
        for name in os.listdir(folder):  # every part index, so each run adds all of them
            if not name.startswith("trained"):
                os.remove(os.path.join(folder, name))
        t = time.perf_counter()
        build_distributed(store, key, nlist, seed, workers=w)
        times[w] = time.perf_counter() - t
    return {
        "speedup_2_workers_vs_1": times[1] / times[workers],
        "speedup_detail": {
            "n": store.count,
            "index_key": key,
            "add_and_merge_seconds_1_worker": times[1],
            f"add_and_merge_seconds_{workers}_workers": times[workers],
        },
    }


def run(
    root: str,
    n: int,
    parts: int,
    workers: int,
    budget: str,
    work_small: str,
    server_seconds: float,
    only: str,
    ladder_sizes: tuple[int, ...] = (100_000, 1_000_000),
    n_queries: int = N_QUERIES,
    max_query_ms: float = 10.0,
    note: str = "",
) -> dict[str, Any]:
    """Every step in turn (`only`: a comma-separated subset), saving after each."""
    steps = set(only.split(","))
    out: dict[str, Any] = {
        "data": describe(n, parts, 512, n_queries),
        "collection": root,
        "load_average_at_start": list(os.getloadavg()),
        "note": "a 2-core machine shared with other developers' jobs: timings are noisy; "
        "see the load averages",
    }
    if note:
        out["run_note"] = note
    if "write" in steps:
        t = time.perf_counter()
        write_scale_collection(root, n, parts, 512, workers)
        out["write_seconds_this_run"] = time.perf_counter() - t
    if "build" in steps:
        _step(out, "build", lambda: build_10m(root, workers, budget, max_query_ms))
        _step(out, "rows", lambda: rows(root))
        if "failed" not in out:
            with open(root.rstrip("/") + ".READY", "w") as fh:
                fh.write("image index built by python -m bench.index --scale\n")
    if "rows" in steps and "build" not in steps:  # the row files alone, on a built index
        _step(out, "rows", lambda: rows(root))
    if "server" in steps:
        _step(out, "server", lambda: server(root, server_seconds))
    if "knn" in steps:
        _step(out, "knn", lambda: knn_grid(root, -(-n // parts)))
    if "quality" in steps:
        # a first answer on 200 of the queries: the exact answers of 1,000 take a while here
        _step(out, "quality_200", lambda: {"first_200": quality(root, min(200, n_queries))})
        _step(out, "quality", lambda: quality(root, n_queries))
    if "ladder" in steps:
        _step(out, "ladder", lambda: ladder(work_small, ladder_sizes, workers, budget))
    out["load_average_at_end"] = list(os.getloadavg())
    _save(out)
    return out
