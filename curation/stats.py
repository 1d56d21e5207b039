"""`python -m curation.stats COLLECTION [--column clip_similarity ...] [--bins 30]`: counts and
histograms.

What the UI's Explore page shows, as functions and a command: rows by status, the commonest
failure messages, and histograms of the scores, sizes and caption length. Every figure is
one aggregate query in DuckDB over the catalog (`curation.catalog.Catalog`, trusted or
sandboxed), so no row is ever loaded into the caller: the cost does not grow with what the
page holds, only with the scan.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from collection import schema as S
from models.runtime import setup_logging

#: what can be plotted: a name, and the SQL expression over `samples` it is
HISTOGRAMS: dict[str, str] = {
    S.CLIP_SIMILARITY: S.CLIP_SIMILARITY,
    S.PUNSAFE: S.PUNSAFE,
    S.PWATERMARK: S.PWATERMARK,
    S.PTOXIC: S.PTOXIC,
    S.WIDTH: S.WIDTH,
    S.HEIGHT: S.HEIGHT,
    "caption_length": f"length({S.CAPTION})",
}
#: scores live in [0, 1]: their bins are fixed there, so two collections' plots line up
UNIT_RANGE = (S.PUNSAFE, S.PWATERMARK, S.PTOXIC)
TABLE = "samples"


@dataclass
class Histogram:
    """Equal-width bins over [low, high]: counts[i] rows fall in [edges[i], edges[i+1])
    (the last bin includes `high`); `missing` rows have no value."""

    column: str
    edges: list[float]
    counts: list[int]
    missing: int
    total: int


def _scalar(catalog: Any, sql: str) -> list[Any]:
    return list(catalog.query(sql).table.to_pylist()[0].values())


def expression(column: str, columns: Sequence[str]) -> str:
    """The SQL a histogram name stands for; ValueError naming the choices when unknown or absent."""
    if column not in HISTOGRAMS:
        raise ValueError(f"histogram column {column!r}: expected one of {sorted(HISTOGRAMS)}")
    needs = S.CAPTION if column == "caption_length" else column
    if needs not in columns:
        raise ValueError(f"histogram column {column!r}: this collection has no {needs!r} column")
    return HISTOGRAMS[column]


def histogram(catalog: Any, column: str, bins: int = 30, where: str | None = None) -> Histogram:
    """Histogram of one of HISTOGRAMS over `samples` (optionally the rows matching `where`):
    two aggregate queries, min/max then the bin counts."""
    if not 1 <= bins <= 1000:
        raise ValueError(f"bins: {bins} is outside 1..1000")
    expr = expression(column, catalog.columns)
    cond = f"({where})" if where else "TRUE"
    low, high, present, total = _scalar(
        catalog,
        f"SELECT min({expr})::DOUBLE, max({expr})::DOUBLE, "
        f"count({expr}), count(*) FROM {TABLE} WHERE {cond}",
    )
    if column in UNIT_RANGE:
        low, high = 0.0, 1.0
    if not present:
        return Histogram(column, [], [], int(total), int(total))
    if high <= low:  # one value: one bin around it
        high = low + 1.0
    width = (high - low) / bins
    rows = catalog.query(
        f"SELECT least(greatest(floor(({expr} - {low!r}) / {width!r}), 0), {bins - 1})::INTEGER "
        "AS b, count(*) AS n "
        f"FROM {TABLE} WHERE {cond} AND {expr} IS NOT NULL GROUP BY b ORDER BY b"
    ).table.to_pylist()
    counts = [0] * bins
    for r in rows:
        counts[r["b"]] += int(r["n"])
    edges = [low + i * width for i in range(bins)] + [high]
    return Histogram(column, edges, counts, int(total - present), int(total))


def status_counts(catalog: Any) -> list[dict[str, Any]]:
    """[{status, n}] for every status present, commonest first (`ok` for the embedded rows)."""
    return catalog.query(
        f"SELECT {S.STATUS} AS status, count(*) AS n FROM {TABLE} "
        f"GROUP BY 1 ORDER BY n DESC, status"
    ).table.to_pylist()


def failures(catalog: Any, limit: int = 20) -> list[dict[str, Any]]:
    """The commonest (status, error) pairs among failed rows, with an example key each."""
    return catalog.query(
        f"SELECT {S.STATUS} AS status, {S.ERROR} AS error, "
        f"count(*) AS n, min({S.KEY}) AS example_key "
        f"FROM {TABLE} WHERE {S.STATUS} IS DISTINCT FROM '{S.STATUS_OK}' GROUP BY 1, 2 "
        f"ORDER BY n DESC, status LIMIT {int(limit)}"
    ).table.to_pylist()


def stats(
    collection: str,
    columns: Sequence[str] = tuple(HISTOGRAMS),
    bins: int = 30,
    where: str | None = None,
    untrusted: bool = False,
) -> dict[str, Any]:
    """The command: status counts, failures and the named histograms as one JSON-able dict."""
    from curation.catalog import (
        Catalog,
    )  # DuckDB: imported after parsing, so --help answers at once

    with Catalog(collection, untrusted=untrusted) as catalog:
        hists, skipped = [], []
        for c in columns:
            try:
                expression(c, catalog.columns)
            except (
                ValueError
            ) as exc:  # an unscored collection has no punsafe column, say: said, not plotted
                skipped.append({"column": c, "why": str(exc)})
                continue
            hists.append(asdict(histogram(catalog, c, bins, where)))
        return {
            "collection": collection,
            "status": status_counts(catalog),
            "failures": failures(catalog),
            "histograms": hists,
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
    p.add_argument("--format", choices=["text", "json"], default="text")
    a = p.parse_args(argv)
    setup_logging()
    try:
        doc = stats(a.collection, a.column or tuple(HISTOGRAMS), a.bins, a.where, a.untrusted)
    except ValueError as exc:  # SqlError and CollectionError included: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    sys.stdout.write(
        json.dumps(doc, indent=1, default=str) + "\n" if a.format == "json" else render_text(doc)
    )


if __name__ == "__main__":
    main()
