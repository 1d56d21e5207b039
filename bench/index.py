"""Index benchmark: recall@10 vs exact, bytes, p50/p99 latency for each candidate key and the
builder's choice on clustered vectors written as a collection.

    python -m bench.index [--n 1000000] [--dim 512] [--budget-ratio 0.1] [--only vectors]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np


def vectors(n: int, dim: int, budget_ratio: float, candidates: list[str], workdir: str) -> dict:
    """Build the chosen index and each candidate on the same collection; report side by side."""
    from indices.build import build_one
    from indices.select import choose_index
    from tests.collection_factory import clustered_vectors, write_collection

    root = os.path.join(workdir, "coll")
    part = 100_000
    imgs = [clustered_vectors(min(part, n - s), dim, 1000, seed=s) for s in range(0, n, part)]
    txts = [clustered_vectors(len(x), dim, 1000, seed=10**6 + s, spread=0.9) for s, x in zip(range(0, n, part), imgs)]
    write_collection(root, imgs, txts)
    del imgs, txts
    budget = int(n * dim * 4 * budget_ratio)
    chosen = choose_index(n, dim, budget).index_key
    rows = []
    for key in [chosen] + [c for c in candidates if c != chosen]:
        t = time.perf_counter()
        doc = build_one(root, "image", budget, 10.0, index_key=key if key != chosen else None)
        rows.append({"index_key": doc["index_key"], "recall_at_10": doc["recall_at_10"],
                     "memory_ratio_vs_flat": doc["memory_ratio_vs_flat"], "p50_ms": doc["p50_ms"],
                     "p99_ms": doc["p99_ms"], "params": doc["params"], "index_bytes": doc["index_bytes"],
                     "bytes_read_per_query": doc["bytes_read_per_query"], "build_seconds": time.perf_counter() - t})
    return {"chosen": rows[0], "candidates": rows[1:],
            "data": {"n": n, "dim": dim, "clusters": 1000, "budget_bytes": budget, "budget_ratio_vs_flat": budget_ratio,
                     "queries": "200 text-like vectors (other modality), truth = exact inner product"}}


def main(argv: list[str] | None = None) -> None:
    from bench.common import write_results

    p = argparse.ArgumentParser(prog="python -m bench.index")
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--budget-ratio", type=float, default=0.1)
    p.add_argument("--candidates", default="Flat,IVF1024,Flat")
    p.add_argument("--only", default="vectors")
    a = p.parse_args(argv)
    cands = [c for c in a.candidates.split(";") if c]
    work = tempfile.mkdtemp(prefix="sieve-bench-index-")
    try:
        payload = {}
        if "vectors" in a.only:
            payload.update(vectors(a.n, a.dim, a.budget_ratio, cands, work))
        print(write_results("index", payload, merge=True))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
