"""Index benchmark: recall@10 vs exact, bytes, p50/p99 latency for each candidate key and the
builder's choice, on generated vectors written as a collection and on a real collection.

    python -m bench.index [--n 1000000] [--dim 512] [--budget-ratio 0.1] [--data clip_like]
                          [--keys chosen,Flat,...] [--work DIR] [--only vectors,real]
                          [--collection PATH]
    python -m bench.index --scale [--scale-root DIR] [--scale-steps write,build,...]

`--scale` is issue 22's 10M benchmark (`bench.index_scale`, key `scale_10m`).

`--data clip_like` (default) draws CLIP-shaped (image, text) pairs: anisotropic, thousands of
overlapping topics, a modality gap, text queries that are noisy views of their images (see
`bench.synthetic.clip_like_pairs`); `clustered` is the older, much easier generator.
Runs with the same --work folder reuse the written collection, and rows of keys not re-run
are kept, so each candidate can be built in its own (CPU-locked) run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from typing import Any

from bench import index_scale
from bench.common import RESULTS_DIR, write_results
from bench.synthetic import clip_like_pairs, clustered_vectors, write_collection
from collection.embeddings import EmbeddingStore
from collection.storage import read_collection_json
from indices.build import build_one
from models.runtime import setup_logging

PART = 100_000
#: sweep columns kept per candidate: enough to see what nprobe and the re-rank depth buy
SWEEP_COLUMNS = ("nprobe", "efSearch", "rerank_k", "recall_at_10", "p99_ms")


def write_vectors(root: str, n: int, dim: int, data: str) -> None:
    """The generated collection (image vectors indexed, text vectors as queries), part by part."""
    if os.path.exists(os.path.join(root, "collection.json")):
        return
    if data == "clip_like":
        pairs = [clip_like_pairs(min(PART, n - s), dim, seed=s) for s in range(0, n, PART)]
        imgs, txts = [p[0] for p in pairs], [p[1] for p in pairs]
    elif data == "clustered":
        imgs = [clustered_vectors(min(PART, n - s), dim, 1000, seed=s) for s in range(0, n, PART)]
        txts = [
            clustered_vectors(len(x), dim, 1000, seed=10**6 + s, spread=0.9)
            for s, x in zip(range(0, n, PART), imgs)
        ]
    else:
        raise ValueError(f"--data: unknown {data!r}; expected clip_like or clustered")
    write_collection(root, imgs, txts)


def measure(
    root: str, modality: str, budget: int, key: str | None, max_query_ms: float
) -> dict[str, Any]:
    """Build one index (key None: the builder's own choice) and report it."""
    t = time.perf_counter()
    doc = build_one(root, modality, budget, max_query_ms, index_key=key)
    return {
        "index_key": doc["index_key"],
        "recall_at_10": doc["recall_at_10"],
        "memory_ratio_vs_flat": doc["memory_ratio_vs_flat"],
        "p50_ms": doc["p50_ms"],
        "p99_ms": doc["p99_ms"],
        "params": doc["params"],
        "index_bytes": doc["index_bytes"],
        "bytes_read_per_query": doc["bytes_read_per_query"],
        "build_seconds": time.perf_counter() - t,
        "sweep": [{c: r[c] for c in SWEEP_COLUMNS if c in r} for r in doc.get("sweep", [])],
    }


def _merge(
    old: dict[str, Any] | None, same_data: bool, chosen: dict | None, rows: list[dict]
) -> dict[str, Any]:
    """New rows replace old ones of the same key; old rows of other keys stay if the data match."""
    keep = [
        r
        for r in (old or {}).get("candidates", [])
        if same_data and r["index_key"] not in {x["index_key"] for x in rows}
    ]
    out = {"candidates": keep + rows}
    out["chosen"] = (
        chosen if chosen is not None else ((old or {}).get("chosen") if same_data else None)
    )
    return out


def vectors(
    n: int,
    dim: int,
    budget_ratio: float,
    keys: list[str],
    workdir: str,
    data: str,
    max_query_ms: float,
    previous: dict[str, Any],
) -> dict[str, Any]:
    """The chosen index and each candidate on the same generated collection, side by side."""
    root = os.path.join(workdir, f"{data}-{n}x{dim}")
    write_vectors(root, n, dim, data)
    budget = int(n * dim * 4 * budget_ratio)
    meta = {
        "n": n,
        "dim": dim,
        "generator": data,
        "budget_bytes": budget,
        "budget_ratio_vs_flat": budget_ratio,
        "max_query_ms": max_query_ms,
        "queries": "200 text vectors of indexed pairs (the other modality), "
        "truth = exact inner product over all n",
    }
    if data == "clip_like":
        meta["shape"] = (
            "4096 topics under 64 super-topics, Zipf(0.8) popularity, "
            "power-law spectrum (exponent 0.6) "
            "in a random basis, modality offsets, text = image latent + noise"
        )
    old = previous.get("data")
    same = bool(old) and all(
        old.get(k) == meta[k] for k in ("n", "dim", "generator", "budget_bytes")
    )
    chosen = measure(root, "image", budget, None, max_query_ms) if "chosen" in keys else None
    rows = [measure(root, "image", budget, k, max_query_ms) for k in keys if k != "chosen"]
    return {**_merge(previous if same else None, same, chosen, rows), "data": meta}


def real(collection: str, budget: str, keys: list[str], max_query_ms: float) -> dict[str, Any]:
    """The builder's choice and candidates on a real collection's image embeddings, text queries.
    Builds into a copy so the collection's own index is left alone."""
    with tempfile.TemporaryDirectory(prefix="sieve-bench-real-") as tmp:
        root = os.path.join(tmp, "c")
        shutil.copytree(collection, root, ignore=shutil.ignore_patterns("indices"))
        store = EmbeddingStore.open(root, "image")
        chosen = measure(root, "image", budget, None, max_query_ms)
        rows = [measure(root, "image", budget, k, max_query_ms) for k in keys if k != "chosen"]
        info = read_collection_json(root)
    return {
        "chosen": chosen,
        "candidates": rows,
        "data": {
            "collection": collection,
            "n": store.count,
            "dim": store.dim,
            "clip_model": info.get("clip_model"),
            "max_index_memory": budget,
            "queries": "text embeddings of the collection's captions",
        },
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.index", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--budget-ratio", type=float, default=0.1)
    p.add_argument("--data", default="clip_like", choices=("clip_like", "clustered"))
    p.add_argument(
        "--keys",
        default="chosen;OPQ64_256,IVF4096,PQ64x8",
        help="';'-separated faiss keys to measure; 'chosen' is the builder's pick",
    )
    p.add_argument("--max-query-ms", type=float, default=10.0)
    p.add_argument(
        "--work", default=None, help="keep the generated collection here (reused by later runs)"
    )
    p.add_argument("--only", default="vectors", help="vectors and/or real")
    p.add_argument("--collection", help="a real collection (part 'real')")
    p.add_argument("--real-budget", default="4G")
    p.add_argument("--real-keys", default="chosen;HNSW32;IVF64,PQ16x8")
    p.add_argument("--scale", action="store_true", help="the 10M benchmark (key scale_10m)")
    p.add_argument("--scale-root", default="/work/bench_data/synth10m", help="kept: reused")
    p.add_argument("--scale-n", type=int, default=10_000_000)
    p.add_argument("--scale-parts", type=int, default=100)
    p.add_argument("--scale-workers", type=int, default=2)
    p.add_argument("--scale-budget", default="4G")
    p.add_argument("--scale-work", default="/work/bench_data/c22", help="ladder data, removed")
    p.add_argument("--scale-server-seconds", type=float, default=20.0)
    p.add_argument("--scale-queries", type=int, default=1000, help="held-out recall queries")
    p.add_argument("--scale-max-query-ms", type=float, default=10.0, help="the build's p99 budget")
    p.add_argument("--scale-note", default="", help="recorded with the figures")
    p.add_argument("--scale-ladder", default="100000,1000000", help="smaller sizes, built too")
    p.add_argument(
        "--scale-steps", default="write,build,quality,server,knn,ladder", help="a subset"
    )
    a = p.parse_args(argv)
    if a.scale:
        setup_logging()
        index_scale.run(
            a.scale_root,
            a.scale_n,
            a.scale_parts,
            a.scale_workers,
            a.scale_budget,
            a.scale_work,
            a.scale_server_seconds,
            a.scale_steps,
            tuple(int(x) for x in a.scale_ladder.split(",")),
            a.scale_queries,
            a.scale_max_query_ms,
            a.scale_note,
        )
        return
    keys = [c for c in a.keys.split(";") if c]
    work = a.work or tempfile.mkdtemp(prefix="sieve-bench-index-")
    path = RESULTS_DIR / "index.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    try:
        payload: dict[str, Any] = {}
        if "vectors" in a.only:
            payload.update(
                vectors(a.n, a.dim, a.budget_ratio, keys, work, a.data, a.max_query_ms, previous)
            )
        if "real" in a.only:
            if not a.collection:
                raise SystemExit("--collection is needed for part 'real'")
            payload["real_collection"] = real(
                a.collection,
                a.real_budget,
                [k for k in a.real_keys.split(";") if k],
                a.max_query_ms,
            )
        print(write_results("index", payload, merge=True))
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
