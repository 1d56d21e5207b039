"""`python -m bench.sql_remote [--rows 2000] [--parts 4]` → bench/results/sql_remote.json.

How the trusted catalog reads a collection in a bucket (moto's S3 server on loopback) without
any DuckDB extension: through the pyarrow dataset on the fsspec filesystem that `Catalog`
registers with DuckDB, against DuckDB's own Parquet reader on the same filesystem through
`duckdb.register_filesystem`, and against the same collection in a folder. Each time is the
median of `--repeats` runs after one warm-up run, per query (every column, an aggregate, a
filter on `id`); `register_filesystem_vs_dataset` is the median over the queries of
register_filesystem seconds / dataset seconds. Also the sandboxed catalog's first query on an
empty cache (which copies the parts locally first) and its later ones.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from typing import Any, Callable

import duckdb

from bench.common import write_results
from bench.loopback_s3 import available, loopback_s3
from bench.synthetic import write_metadata_parts
from collection import schema as S
from collection.storage import url_to_fs
from curation.catalog import Catalog, Parts
from models.runtime import setup_logging

#: the queries timed on each engine: a scan of every column, an aggregate, a filter on id
QUERIES = {
    "all_rows": f"SELECT * FROM samples ORDER BY {S.KEY}",
    "group_by": f"SELECT {S.LANGUAGE}, count(*) AS n, avg({S.CLIP_SIMILARITY}) AS s "
    "FROM samples GROUP BY 1 ORDER BY 1",
    "filtered_ids": f"SELECT {S.ID} FROM samples WHERE {S.ID} IS NOT NULL "
    f"AND {S.CLIP_SIMILARITY} > 0.3 ORDER BY {S.ID}",
}


def _median_s(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """(median seconds of `repeats` runs after one warm-up run, the last result)."""
    out = fn()
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs), out


def _register_filesystem(remote: str, parts: Parts) -> Any:
    """The engine not chosen: DuckDB's own Parquet reader on the fsspec filesystem, registered
    with `duckdb.register_filesystem` (extension downloads off: nothing may be fetched)."""
    con = duckdb.connect(":memory:")
    con.execute("SET autoinstall_known_extensions=false")
    con.execute("SET autoload_known_extensions=false")
    con.register_filesystem(url_to_fs(remote)[0])
    files = ", ".join(f"'{f}'" for f in parts.files)
    con.execute(
        f"CREATE VIEW samples AS SELECT {parts.select()} "
        f"FROM read_parquet([{files}], union_by_name=true)"
    )
    return con


def _engines(local: Catalog, dataset: Catalog, con: Any, sql: str) -> dict[str, Callable]:
    return {
        "local": lambda: local.query(sql).table,
        "pyarrow_dataset": lambda: dataset.query(sql).table,
        "register_filesystem": lambda: con.sql(sql).to_arrow_table(),
    }


def _sandboxed(remote: str, repeats: int) -> dict[str, float]:
    """The sandboxed catalog's first query on an empty cache (parts copied first), then later."""
    cache = tempfile.mkdtemp(prefix="sieve-bench-cache-")
    saved = os.environ.get("SIEVE_CACHE")
    os.environ["SIEVE_CACHE"] = cache
    try:
        t = time.perf_counter()
        with Catalog(remote, untrusted=True) as sandboxed:
            sandboxed.query(QUERIES["group_by"])
            first = time.perf_counter() - t
            later, _ = _median_s(lambda: sandboxed.query(QUERIES["group_by"]), repeats)
    finally:
        if saved is None:
            os.environ.pop("SIEVE_CACHE", None)
        else:
            os.environ["SIEVE_CACHE"] = saved
        shutil.rmtree(cache, ignore_errors=True)
    return {"untrusted_first_query_s": round(first, 4), "untrusted_group_by_s": round(later, 4)}


def run(work: str, rows: int = 2000, parts: int = 4, repeats: int = 5) -> dict[str, Any]:
    """Every query on every engine (answers checked equal), and the sandboxed catalog."""
    reason = available()
    if reason:
        raise SystemExit(f"bench.sql_remote: {reason}")
    root = os.path.join(work, f"metadata-{rows}-{parts}")
    write_metadata_parts(root, rows, parts)
    queries: dict[str, dict[str, float]] = {}
    with loopback_s3() as server:
        remote = server.make_bucket("bench-sql") + "/collection"
        server.filesystem().put(root, remote.removeprefix("s3://"), recursive=True)
        with Catalog(root) as local, Catalog(remote) as dataset:
            con = _register_filesystem(remote, dataset.parts)
            for name, sql in QUERIES.items():
                want = local.query(sql).table
                queries[name] = {}
                for engine, fn in _engines(local, dataset, con, sql).items():
                    seconds, got = _median_s(fn, repeats)
                    if not got.equals(want):
                        raise RuntimeError(f"{engine} answered {name} differently from a folder")
                    queries[name][f"{engine}_s"] = round(seconds, 4)
            con.close()
        sandboxed = _sandboxed(remote, repeats)
    ratios = [q["register_filesystem_s"] / q["pyarrow_dataset_s"] for q in queries.values()]
    return {
        "register_filesystem_vs_dataset": round(statistics.median(ratios), 2),
        "chosen": "pyarrow_dataset",
        "rows": rows,
        "parts": parts,
        "repeats": repeats,
        "queries": queries,
        **sandboxed,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.sql_remote",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--work",
        default=os.path.join(tempfile.gettempdir(), "sieve-bench-sql-remote"),
        help="generated metadata, reused across runs",
    )
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--parts", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    setup_logging()
    os.makedirs(a.work, exist_ok=True)
    path = write_results("sql_remote", run(a.work, a.rows, a.parts, a.repeats))
    print(path.read_text())


if __name__ == "__main__":
    main()
