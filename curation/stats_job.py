"""The work behind `python -m curation.stats --workers N` (or `--scheduler ADDR`): one Dask task per
metadata part, in two rounds (each histogram's range, then its bin counts).

Each task opens its own part in DuckDB as table `samples` and runs the very queries the
catalog path runs (`curation.stats`: bounds, bin_counts, status_counts, failures), so the two
paths agree to the count. The driver holds per-part aggregates only (a few numbers per column,
one row per status and per failure message) and merges them in part order, so the result does
not depend on the number of workers or on the order tasks finish.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from collection import schema as S
from collection.cluster import each_completed, open_cluster
from collection.parts import CollectionError, complete_parts, missing_parts
from collection.sandbox import one_line
from collection.storage import is_local, url_to_fs
from curation.stats_queries import (
    TABLE,
    Histogram,
    bin_counts,
    bin_range,
    bounds,
    edges,
    expression,
    failures,
    status_counts,
)
from models.runtime import cores

log = logging.getLogger(__name__)

#: failure messages the result lists, commonest first (as `curation.stats.failures`)
FAILURES = 20


@dataclass
class Answer:
    """A query's rows, as `Catalog.query` returns them."""

    table: pa.Table


class PartTable:
    """One metadata part as table `samples` in a DuckDB connection of its own: what a task
    queries with the catalog path's own SQL."""

    def __init__(self, url: str) -> None:
        self.con = duckdb.connect(":memory:")
        self.con.execute("SET enable_progress_bar=false")
        fs, path = url_to_fs(url)
        try:
            if is_local(url):
                quoted = path.replace("'", "''")
                scan = f"read_parquet('{quoted}')"
                self.columns = pq.read_schema(path).names
            else:  # no DuckDB extension to download: the part comes through fsspec
                self.con.register("_part", pq.read_table(path, filesystem=fs))
                scan = "_part"
                self.columns = self.con.table("_part").columns
        except FileNotFoundError:
            raise CollectionError(f"{url}: missing metadata part") from None
        except (OSError, pa.ArrowInvalid) as exc:
            raise CollectionError(f"{url}: unreadable metadata part: {one_line(exc)}") from None
        self.con.execute(f"CREATE VIEW {TABLE} AS SELECT * FROM {scan}")

    def query(self, sql: str) -> Answer:
        return Answer(self.con.sql(sql).to_arrow_table())

    def close(self) -> None:
        self.con.close()


def part_summary(url: str, columns: Sequence[str], where: str | None) -> dict[str, Any]:
    """Round one, one part: each present column's (min, max, present, rows), the status
    counts and every failure message's count."""
    part = PartTable(url)
    try:
        got: dict[str, Any] = {"bounds": {}, "absent": {}}
        for c in columns:
            try:
                expression(c, part.columns)
            except ValueError as exc:  # this part lacks the column: its rows have no value
                got["absent"][c] = str(exc)
                continue
            got["bounds"][c] = bounds(part, c, where)
        got["rows"] = int(part.query(f"SELECT count(*) AS n FROM {TABLE}").table[0][0].as_py())
        got["status"] = status_counts(part)
        got["failures"] = failures(part, limit=None)
        return got
    finally:
        part.close()


def part_bins(
    url: str, plan: dict[str, tuple[float, float]], bins: int, where: str | None
) -> dict[str, list[int]]:
    """Round two, one part: bin counts of each column `plan` gives (low, width) for."""
    part = PartTable(url)
    try:
        got = {}
        for c, (low, width) in plan.items():
            try:
                expression(c, part.columns)
            except ValueError:  # this part lacks the column: nothing to count
                continue
            got[c] = bin_counts(part, c, low, width, bins, where)
        return got
    finally:
        part.close()


def _gather(client: Any, fn: Any, args: list[tuple], name: str, urls: list[str]) -> list[Any]:
    """Every task's value, in part order; ValueError naming the first part that failed."""
    values: list[Any] = [None] * len(args)
    failed = {}
    for outcome in each_completed(client, fn, args, name):
        if outcome.error is None:
            values[outcome.index] = outcome.value
        else:
            failed[outcome.index] = outcome.error
    if failed:
        first = min(failed)
        raise ValueError(f"{urls[first]}: {one_line(failed[first])}")
    return values


def _merge_counts(groups: list[list[dict[str, Any]]], keys: tuple[str, ...]) -> list[dict]:
    """Per-part grouped counts summed (example_key: the smallest), in the catalog's order."""
    merged: dict[tuple, dict[str, Any]] = {}
    for rows in groups:
        for r in rows:
            k = tuple(r[name] for name in keys)
            m = merged.setdefault(k, {**r, "n": 0})
            m["n"] += int(r["n"])
            if "example_key" in r and r["example_key"] is not None:
                m["example_key"] = min(m["example_key"] or r["example_key"], r["example_key"])
    return sorted(
        merged.values(),
        key=lambda r: (-r["n"], *((r[k] is None, r[k] or "") for k in keys)),
    )


def run_stats(
    collection: str,
    columns: Sequence[str],
    bins: int,
    where: str | None,
    scheduler: str | None,
    workers: int | None,
) -> dict[str, Any]:
    """`curation.stats.stats` on a Dask cluster, one task per complete part."""
    problems = missing_parts(collection)
    if problems:
        raise CollectionError(
            f"{collection}: {'; '.join(problems)}: finish them with `python -m pipelines.embed` "
            "(it resumes unfinished parts) before computing stats"
        )
    layout = S.CollectionLayout(collection)
    urls = [layout.metadata(n) for n in complete_parts(collection)]
    n = workers or max(1, min(cores(), len(urls)))
    with open_cluster(scheduler, n) as session:
        summaries = _gather(
            session.client,
            part_summary,
            [(u, tuple(columns), where) for u in urls],
            "stats-summary",
            urls,
        )
        hists, skipped, plan, totals = [], [], {}, {}
        rows = sum(s["rows"] for s in summaries)
        for c in columns:
            found = [s["bounds"][c] for s in summaries if c in s["bounds"]]
            if not found:
                skipped.append({"column": c, "why": summaries[0]["absent"][c]})
                continue
            lows = [b[0] for b in found if b[0] is not None]
            highs = [b[1] for b in found if b[1] is not None]
            present = sum(b[2] for b in found)
            totals[c] = (present, sum(b[3] for b in found))
            if present:
                low, high, width = bin_range(c, min(lows), max(highs), bins)
                plan[c] = (low, width)
                totals[c] += (high,)
        counts = _gather(
            session.client,
            part_bins,
            [(u, plan, bins, where) for u in urls],
            "stats-bins",
            urls,
        )
    for c in columns:
        if c not in totals:
            continue
        present, total = totals[c][:2]
        if not present:
            hists.append(asdict(Histogram(c, [], [], total, total)))
            continue
        low, width = plan[c]
        summed = [sum(part.get(c, [0] * bins)[i] for part in counts) for i in range(bins)]
        hist = Histogram(c, edges(low, totals[c][2], width, bins), summed, total - present, total)
        hists.append(asdict(hist))
    log.info("stats over %d rows in %d parts", rows, len(urls))
    return {
        "collection": collection,
        "status": _merge_counts([s["status"] for s in summaries], ("status",)),
        "failures": _merge_counts([s["failures"] for s in summaries], ("status", "error"))[
            :FAILURES
        ],
        "histograms": hists,
        "skipped": skipped,
    }
