"""`python -m curation.stats COLLECTION [--column clip_similarity ...] [--bins 30] [--workers N]`:
counts and histograms.

What the UI's Explore page shows, as functions and a command: rows by status, the commonest
failure messages, and histograms of the scores, sizes and caption length. Every figure is
one aggregate query in DuckDB over the catalog (`curation.catalog.Catalog`, trusted or
sandboxed), so no row is ever loaded into the caller: the cost does not grow with what the
page holds, only with the scan. `--workers N` / `--scheduler ADDR` spread the scan over a Dask
cluster, one task per part (`curation.stats_job`), with the same result.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from typing import Any, Sequence

from collection.cluster_options import add_cluster_options
from curation.stats_queries import (
    HISTOGRAMS,
    TABLE,
    UNIT_RANGE,
    Histogram,
    bin_counts,
    bin_range,
    bounds,
    check_bins,
    edges,
    expression,
    failures,
    histogram,
    histograms,
    status_counts,
)
from models.runtime import setup_logging

__all__ = [
    "stats",
    "overview",
    "render_text",
    "main",
    "HISTOGRAMS",
    "TABLE",
    "UNIT_RANGE",
    "Histogram",
    "bin_counts",
    "bin_range",
    "bounds",
    "check_bins",
    "edges",
    "expression",
    "failures",
    "histogram",
    "histograms",
    "status_counts",
]


def stats(
    collection: str,
    columns: Sequence[str] = tuple(HISTOGRAMS),
    bins: int = 30,
    where: str | None = None,
    untrusted: bool = False,
    scheduler: str | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """The command: status counts, failures and the named histograms as one JSON-able dict.

    With `workers` or `scheduler` (trusted only), one Dask task per part computes its share
    (`curation.stats_job`), for collections one machine should not scan alone; the figures are
    the same.
    """
    check_bins(bins)
    if (workers or scheduler) and not untrusted:
        from curation.stats_job import run_stats  # Dask: after parsing, so --help answers at once

        return run_stats(collection, columns, bins, where, scheduler, workers)
    from curation.catalog import (
        Catalog,
    )  # DuckDB: imported after parsing, so --help answers at once

    with Catalog(collection, untrusted=untrusted) as catalog:
        return {"collection": collection, **overview(catalog, columns, bins, where)}


def overview(
    catalog: Any,
    columns: Sequence[str] = tuple(HISTOGRAMS),
    bins: int = 30,
    where: str | None = None,
) -> dict[str, Any]:
    """Rows by status, the commonest failures and the histograms of `columns` the collection
    has (those it lacks listed under "skipped", with why): what the command prints and the
    Explore page opens with, in four aggregate queries."""
    present, skipped = [], []
    for c in columns:
        try:
            expression(c, catalog.columns)
            present.append(c)
        except ValueError as exc:  # an unscored collection has no punsafe column, say
            skipped.append({"column": c, "why": str(exc)})  # said, not plotted
    return {
        "status": status_counts(catalog),
        "failures": failures(catalog),
        "histograms": [asdict(h) for h in histograms(catalog, present, bins, where)],
        "skipped": skipped,
    }


def _bar(n: int, most: int, width: int = 40) -> str:
    return "#" * (math.ceil(width * n / most) if most and n else 0)


def render_text(doc: dict[str, Any]) -> str:
    """The stats as text for a terminal: counts, then one bar chart per histogram."""
    lines = [f"{r['status']:>16}  {r['n']}" for r in doc["status"]]
    for f in doc["failures"]:
        lines.append(f"  {f['n']:>8} x {f['status']}: {f['error']} (e.g. {f['example_key']})")
    for skip in doc.get("skipped", []):
        lines.append(f"(no histogram: {skip['why']})")
    for h in doc["histograms"]:
        lines.append(
            f"\n{h['column']} ({h['total'] - h['missing']} values, {h['missing']} missing)"
        )
        most = max(h["counts"], default=0)
        for lo, n in zip(h["edges"], h["counts"]):
            lines.append(f"  {lo:>10.4g}  {n:>9}  {_bar(n, most)}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m curation.stats",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("collection")
    p.add_argument(
        "--column",
        action="append",
        choices=sorted(HISTOGRAMS),
        default=None,
        help="a histogram to compute (repeatable; default: all)",
    )
    p.add_argument("--bins", type=int, default=30)
    p.add_argument("--where", default=None, help="only rows matching this SQL condition")
    p.add_argument("--untrusted", action="store_true", help="run sandboxed, as the UI does")
    add_cluster_options(p, "one Dask task per part on a LocalCluster of N workers")
    p.add_argument("--format", choices=["text", "json"], default="text")
    a = p.parse_args(argv)
    setup_logging()
    try:
        doc = stats(
            a.collection,
            a.column or tuple(HISTOGRAMS),
            a.bins,
            a.where,
            a.untrusted,
            a.scheduler,
            a.workers,
        )
    except ValueError as exc:  # SqlError and CollectionError included: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    sys.stdout.write(
        json.dumps(doc, indent=1, default=str) + "\n" if a.format == "json" else render_text(doc)
    )


if __name__ == "__main__":
    main()
