"""`python -m bench.storage [--n 2000] [--work DIR]` → bench/results/storage.json.

The same generated collection (`--n` samples, 64 px, sieve-tiny) local and on `s3://` (moto's
S3 server on 127.0.0.1, `bench.loopback_s3`), each stage run on both side by side: embed (the
shards read from the same place as the collection), the index build, a SQL query (the LAION
filter grouped by language), semantic dedup, and the export of a 500-sample subset. Each
figure is `{stage: {"local_s", "s3_s", "s3_over_local", "runs"}}`, medians of `--repeats` runs
per location taken in alternating order. `export_bytes_fetched_ratio` is the
bytes the s3 export read from the source shards over the bytes of the exported samples' source
members (goal ≤ 1.2: the export reads members by byte range, not whole shards).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from bench.common import write_results
from bench.loopback_s3 import LoopbackS3, loopback_s3
from collection import schema as S
from curation.catalog import Catalog
from curation.dedup import dedup
from curation.export import export
from curation.filters import render
from indices.build import build
from models.runtime import setup_logging
from pipelines.embed import embed
from pipelines.generate import write_sample_dataset

log = logging.getLogger(__name__)

SUBSET = {"name": "bench-500", "limit": 500, "seed": 0}
QUERY = (
    "SELECT language, count(*) AS n, avg(clip_similarity) AS sim FROM samples "
    "WHERE {where} GROUP BY language ORDER BY n DESC"
)


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _stages(shards: str, coll: str, out: str) -> tuple[dict[str, float], dict[str, Any]]:
    """Run every stage on one collection location; seconds per stage and the export manifest."""
    secs: dict[str, float] = {}
    secs["embed"], _ = _timed(lambda: embed(shards, coll, workers=2))
    secs["build"], _ = _timed(lambda: build(coll, max_index_memory="100M", modality="image"))
    where = render("laion")

    def sql() -> Any:
        return Catalog(coll).query(QUERY.format(where=where))

    secs["sql"], result = _timed(sql)
    log.info("sql: %d groups", result.table.num_rows)
    secs["dedup_semantic"], _ = _timed(lambda: dedup(coll, level=S.LEVEL_SEMANTIC, workers=0))
    secs["export_500"], manifest = _timed(
        lambda: export(coll, SUBSET, out, shard_size=250, workers=1)
    )
    return secs, manifest


def _s3_upload(server: LoopbackS3, local: Path, url: str) -> None:
    fs = server.filesystem()
    fs.put(str(local), url.removeprefix("s3://"), recursive=True)


def run(n: int, work: Path, repeats: int = 3) -> dict[str, Any]:
    """Measure every stage local and on s3, `repeats` times in alternating order (the first
    run of a process pays warm-ups); medians per stage and location."""
    shards = work / "shards"
    write_sample_dataset(shards, n, shard_size=500)
    times: dict[str, dict[str, list[float]]] = {}
    with loopback_s3() as server:
        bucket = server.make_bucket("sieve-bench")
        _s3_upload(server, shards, f"{bucket}/shards")
        for r in range(repeats):
            order = ("local", "s3") if r % 2 == 0 else ("s3", "local")
            for where in order:
                base = str(work) if where == "local" else bucket
                secs, manifest = _stages(f"{base}/shards", f"{base}/coll{r}", f"{base}/export{r}")
                for stage, t in secs.items():
                    times.setdefault(stage, {"local": [], "s3": []})[where].append(t)
                if where == "s3":
                    s3_manifest = manifest
    stages = {}
    for stage, by in times.items():
        local, s3 = statistics.median(by["local"]), statistics.median(by["s3"])
        stages[stage] = {
            "local_s": round(local, 3),
            "s3_s": round(s3, 3),
            "s3_over_local": round(s3 / local, 3),
            "runs": {k: [round(t, 3) for t in v] for k, v in by.items()},
        }
    fetched = s3_manifest.get(S.MANIFEST_BYTES_FETCHED)
    members = s3_manifest.get(S.MANIFEST_MEMBER_BYTES)
    return {
        "n": n,
        "repeats": repeats,
        "stages": stages,
        "export_bytes_fetched": fetched,
        "export_member_bytes": members,
        "export_bytes_fetched_ratio": round(fetched / members, 4) if fetched and members else None,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.storage", description=__doc__)
    ap.add_argument("--n", type=int, default=2000, help="generated samples (default 2000)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per location (default 3)")
    ap.add_argument(
        "--work", default=None, help="scratch folder (default: a temporary one, removed)"
    )
    a = ap.parse_args(argv)
    setup_logging()
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="sieve-bench-storage-"))
    try:
        payload = run(a.n, work, a.repeats)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    path = write_results("storage", payload)
    print(path)


if __name__ == "__main__":
    main()
