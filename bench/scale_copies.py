"""`python -m bench.scale_copies [--n 100000] [--work DIR]` → bench/results/scale.json (`copies`).

The copies level of `curation.dedup` at scale, on generated pictures: `--n` samples with
`--copy-fraction` planted copies (exact, re-encoded, resized, cropped, colour-shifted, overlaid),
made, embedded and indexed as `bench.insight` makes its data (`bench.insight.data`, reused
under --work). `python -m curation.dedup COLLECTION --level copies --workers W` then runs as a
child process, and the resident memory of it (the driver) and of its Dask worker processes is
sampled while it runs.

Figures per size (`copies.by_rows[n]`; the largest size measured so far is also the headline):
rows, seconds, driver_peak_rss_mb, worker_peak_rss_mb, copies_precision, copies_recall (removal
precision / recall against the planted truth, `bench.insight.removal_scores`), recall per
transform, candidate pairs, and what the candidate floors rest on (`planted`): the quantiles of
the planted copies' image-embedding cosine to their originals (the floor
`curation.copy_candidates.COPY_MIN_COSINE`), the share of them within each phash distance (the
banded index's PHASH_MAX_DISTANCE), and the share of them among the candidate pairs.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import psutil
import pyarrow.parquet as pq

from bench.common import RESULTS_DIR, write_results
from bench.insight import data, removal_scores
from collection import schema as S
from collection.embeddings import EmbeddingStore
from collection.parts import read_metadata
from collection.storage import read_json
from curation import copy_candidates as C, copy_sketch as K
from curation.copies import phash_bits
from curation.dedup import COPIES_WORK, read_duplicates
from models.runtime import setup_logging

log = logging.getLogger("bench.scale_copies")

RUN = "bench-scale-copies"
#: generated data and collections, one folder per sample count (bench.copy_candidates too)
WORK = "/work/bench_data/scale-copies"
QUANTILES = (0.001, 0.005, 0.01, 0.05, 0.5)


class Sampler:
    """Peak resident memory of a process and, separately, of each of its descendants, sampled
    every `interval` seconds on a thread."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval = pid, interval
        self.driver_mb = 0.0
        self.children_mb: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            try:
                self.driver_mb = max(self.driver_mb, root.memory_info().rss / 2**20)
                children = root.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for child in children:
                try:
                    mb = child.memory_info().rss / 2**20
                except psutil.NoSuchProcess:
                    continue
                self.children_mb[child.pid] = max(self.children_mb.get(child.pid, 0.0), mb)
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def planted(collection: str) -> tuple[np.ndarray, np.ndarray, Any]:
    """(each sample's true original's position, the planted copies' positions, the metadata)."""
    meta = read_metadata(collection, [S.KEY, S.PHASH, "dup_of", "transform"])
    keys = meta.column(S.KEY).to_pylist()
    index = {k: i for i, k in enumerate(keys)}
    dup_of = meta.column("dup_of").to_pylist()
    root = np.array([index[d] if d else i for i, d in enumerate(dup_of)], np.int64)
    return root, np.nonzero(root != np.arange(len(root)))[0], meta


def candidate_pairs(work: str) -> np.ndarray:
    """(m, 2) candidate pairs the run planned (its pairs files)."""
    files = sorted(glob.glob(os.path.join(work, "pairs-*.parquet")))
    tables = [pq.read_table(f, columns=["i", "j"]) for f in files]
    if not tables:
        return np.zeros((0, 2), np.int64)
    return np.concatenate([np.stack([t["i"].to_numpy(), t["j"].to_numpy()], 1) for t in tables])


def floors(collection: str, root: np.ndarray, copies: np.ndarray, meta: Any, work: str) -> dict:
    """What the candidate floors rest on: the planted pairs' cosine and phash distance, and the
    share of planted pairs among the candidates."""
    store = EmbeddingStore.open(collection, S.MODALITY_IMAGE)
    a, b = store.gather(copies), store.gather(root[copies])
    cos = np.einsum("nd,nd->n", a, b)
    hashes = meta.column(S.PHASH).to_pylist()
    bits = phash_bits([hashes[i] for i in copies]) ^ phash_bits([hashes[i] for i in root[copies]])
    dist = np.unpackbits(bits, axis=1).sum(1)
    pairs = candidate_pairs(work)
    code = pairs[:, 0] * len(root) + pairs[:, 1]
    lo, hi = np.minimum(copies, root[copies]), np.maximum(copies, root[copies])
    among = np.isin(lo * len(root) + hi, code)
    transforms = np.array(meta.column("transform").to_pylist(), dtype=object)[copies]
    return {
        "pairs": len(copies),
        "cosine_quantiles": {f"{q:g}": round(float(np.quantile(cos, q)), 4) for q in QUANTILES},
        "cosine_min": round(float(cos.min()), 4),
        "phash_within": {str(d): round(float((dist <= d).mean()), 4) for d in (2, 4, 7, 10, 16)},
        "among_candidates": round(float(among.mean()), 4),
        "among_candidates_by_transform": {
            str(t): round(float(among[transforms == t].mean()), 4) for t in sorted(set(transforms))
        },
    }


def run(n: int, work: str, copy_fraction: float, workers: int) -> dict[str, Any]:
    """Make (or reuse) the data, run the copies level in a child process, score it."""
    t = time.perf_counter()
    collection = data(os.path.join(work, f"n{n}"), n, copy_fraction, workers)
    log.info("data ready in %.0f s: %s", time.perf_counter() - t, collection)
    cmd = [sys.executable, "-m", "curation.dedup", collection, "--level", S.LEVEL_COPIES]
    cmd += ["--workers", str(workers), "--run", RUN, "--keep-work"]  # floors() reads its pairs
    layout = S.InsightLayout(collection)
    shutil.rmtree(layout.dedup_run(RUN), ignore_errors=True)  # a fresh run, timed whole
    t = time.perf_counter()
    proc = subprocess.Popen(cmd)
    with Sampler(proc.pid) as sampler:
        rc = proc.wait()
    seconds = time.perf_counter() - t
    if rc:
        raise RuntimeError(f"{' '.join(cmd)} exited with {rc}")
    report = read_json(layout.dedup_report(RUN))
    root, copies, meta = planted(collection)
    table = read_duplicates(collection, run=RUN)
    index = {k: i for i, k in enumerate(meta.column(S.KEY).to_pylist())}
    pred = np.arange(len(root))
    members = [index[k] for k in table.column(S.DUP_KEY).to_pylist()]
    pred[members] = len(root) + table.column(S.DUP_GROUP).to_numpy()
    scores = removal_scores(pred, root)
    found = np.zeros(len(root), bool)
    found[members] = True
    transforms = np.array(meta.column("transform").to_pylist(), dtype=object)
    by_transform = {
        str(t): round(float(found[copies][transforms[copies] == t].mean()), 4)
        for t in sorted(set(transforms[copies]))
    }
    work_dir = os.path.join(layout.dedup_run(RUN), COPIES_WORK)
    worker_peak = max(sampler.children_mb.values(), default=float("nan"))
    return {
        "rows": len(root),
        "seconds": round(seconds, 1),
        "driver_peak_rss_mb": round(sampler.driver_mb, 1),
        "worker_peak_rss_mb": round(worker_peak, 1),
        "copies_precision": scores["precision"],
        "copies_recall": scores["recall"],
        "scores": scores,
        "recall_by_transform": by_transform,
        "report": {k: report[k] for k in ("copies", "removed")},
        "workers": workers,
        "planted": floors(collection, root, copies, meta, work_dir),
        "settings": {
            "phash_max_distance": C.PHASH_MAX_DISTANCE,
            "phash_bands": len(C.bands()),
            "neighbours": C.COPY_NEIGHBOURS,
            "min_cosine": C.COPY_MIN_COSINE,
            "pairs_per_task": C.PAIRS_PER_TASK,
            "local_max_shared": C.LOCAL_MAX_SHARED,
            "keypoints": K.KEYPOINTS,
            "cell_grid": K.CELL_GRID,
        },
        "note": "driver: the `python -m curation.dedup` process; workers: the largest of its "
        "descendant processes (Dask nannies and workers), RSS sampled every 0.2 s",
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.scale_copies",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--n", type=int, default=100_000, help="generated samples")
    p.add_argument(
        "--work",
        default=WORK,
        help="generated data and collections, reused between runs (one folder per --n)",
    )
    p.add_argument("--copy-fraction", type=float, default=0.05, help="planted copies")
    p.add_argument("--workers", type=int, default=2, help="Dask workers (embed and dedup)")
    a = p.parse_args(argv)
    setup_logging()
    os.makedirs(a.work, exist_ok=True)
    figures = run(a.n, a.work, a.copy_fraction, a.workers)
    path = RESULTS_DIR / "scale.json"
    before = json.loads(path.read_text()).get("copies", {}) if path.exists() else {}
    by_rows = {**before.get("by_rows", {}), str(a.n): figures}
    largest = by_rows[max(by_rows, key=int)]
    headline = {k: largest[k] for k in ("rows", "seconds", "driver_peak_rss_mb")}
    headline.update(
        {k: largest[k] for k in ("worker_peak_rss_mb", "copies_precision", "copies_recall")}
    )
    out = write_results("scale", {"copies": {**headline, "by_rows": by_rows}}, merge=True)
    log.info("%s: copies at %d rows: %s", out, a.n, {k: figures[k] for k in headline})


if __name__ == "__main__":
    main()
