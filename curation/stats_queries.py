"""The queries behind `python -m curation.stats` and the UI's Explore page: one aggregate each
over table `samples`, run on whatever answers `.query(sql).table` and `.columns` (the catalog,
trusted or sandboxed, or one part in a Dask task: `curation.stats_job`), so every path counts
alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from collection import schema as S

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
    if column == "caption_length" and S.CAPTION_LENGTH in columns:
        return S.CAPTION_LENGTH  # the same number, written beside the caption: no string read
    if needs not in columns:
        raise ValueError(f"histogram column {column!r}: this collection has no {needs!r} column")
    return HISTOGRAMS[column]


def bounds(catalog: Any, column: str, where: str | None = None) -> tuple[Any, Any, int, int]:
    """(min, max, values present, rows) of a histogram's expression: its first query."""
    expr = expression(column, catalog.columns)
    cond = f"({where})" if where else "TRUE"
    low, high, present, total = _scalar(
        catalog,
        f"SELECT min({expr})::DOUBLE, max({expr})::DOUBLE, "
        f"count({expr}), count(*) FROM {TABLE} WHERE {cond}",
    )
    return low, high, int(present), int(total)


def bin_range(column: str, low: float, high: float, bins: int) -> tuple[float, float, float]:
    """(low, high, width) of the bins: scores fixed on [0, 1], one value given one bin around
    it."""
    if column in UNIT_RANGE:
        low, high = 0.0, 1.0
    if high <= low:
        high = low + 1.0
    return low, high, (high - low) / bins


def bin_counts(
    catalog: Any, column: str, low: float, width: float, bins: int, where: str | None = None
) -> list[int]:
    """Rows per bin (the last bin includes the top edge): a histogram's second query."""
    expr = expression(column, catalog.columns)
    cond = f"({where})" if where else "TRUE"
    rows = catalog.query(
        f"SELECT {_bin_of(expr, low, width, bins)} AS b, count(*) AS n "
        f"FROM {TABLE} WHERE {cond} AND {expr} IS NOT NULL GROUP BY b ORDER BY b"
    ).table.to_pylist()
    counts = [0] * bins
    for r in rows:
        counts[r["b"]] += int(r["n"])
    return counts


def check_bins(bins: int) -> None:
    """ValueError naming the option when `bins` is out of range."""
    if not 1 <= bins <= 1000:
        raise ValueError(f"bins: {bins} is outside 1..1000")


def histogram(catalog: Any, column: str, bins: int = 30, where: str | None = None) -> Histogram:
    """Histogram of one of HISTOGRAMS over `samples` (optionally the rows matching `where`):
    two aggregate queries, min/max then the bin counts."""
    return histograms(catalog, [column], bins, where)[0]


def _bin_of(expr: str, low: float, width: float, bins: int) -> str:
    """The SQL bin number of a non-NULL value (the last bin includes the top edge); clamped as
    an INTEGER, several times cheaper in DuckDB than clamping the DOUBLE."""
    return f"least(greatest(floor(({expr} - {low!r}) / {width!r})::INTEGER, 0), {bins - 1})"


def histograms(
    catalog: Any, columns: Sequence[str], bins: int = 30, where: str | None = None
) -> list[Histogram]:
    """Histograms of several of HISTOGRAMS at once, in two aggregate queries whatever their
    number: every column's min/max in one scan, then every column's bin counts in one more
    (each query costs a scan of the collection: one per column would cost N per column)."""
    check_bins(bins)
    exprs = [expression(c, catalog.columns) for c in columns]
    if not exprs:
        return []
    cond = f"({where})" if where else "TRUE"
    figures = ", ".join(
        f"min({e})::DOUBLE AS lo_{i}, max({e})::DOUBLE AS hi_{i}, count({e}) AS n_{i}"
        for i, e in enumerate(exprs)
    )
    first = catalog.query(f"SELECT count(*) AS rows, {figures} FROM {TABLE} WHERE {cond}")
    row = first.table.to_pylist()[0]
    total = int(row["rows"])
    ranges: dict[int, tuple[float, float, float]] = {}
    for i, c in enumerate(columns):
        if row[f"n_{i}"]:
            ranges[i] = bin_range(c, row[f"lo_{i}"], row[f"hi_{i}"], bins)
    counts = {i: [0] * bins for i in ranges}
    if ranges:
        # one histogram() aggregate per column over the same scan (a GROUP BY per column would
        # scan once each); the FILTER keeps missing values out (least/greatest skip a NULL)
        binned = ", ".join(
            f"histogram({_bin_of(exprs[i], lo, w, bins)}) FILTER (WHERE {exprs[i]} IS NOT NULL)"
            f" AS h_{i}"
            for i, (lo, _, w) in ranges.items()
        )
        found = catalog.query(f"SELECT {binned} FROM {TABLE} WHERE {cond}").table.to_pylist()[0]
        for i in ranges:
            for b, n in found[f"h_{i}"] or []:
                counts[i][b] += int(n)
    out = []
    for i, c in enumerate(columns):
        if i not in ranges:
            out.append(Histogram(c, [], [], total, total))
            continue
        low, high, width = ranges[i]
        present = int(row[f"n_{i}"])
        out.append(Histogram(c, edges(low, high, width, bins), counts[i], total - present, total))
    return out


def edges(low: float, high: float, width: float, bins: int) -> list[float]:
    """The bins' edges, `bins + 1` of them."""
    return [low + i * width for i in range(bins)] + [high]


def status_counts(catalog: Any) -> list[dict[str, Any]]:
    """[{status, n}] for every status present, commonest first (`ok` for the embedded rows)."""
    return catalog.query(
        f"SELECT {S.STATUS} AS status, count(*) AS n FROM {TABLE} "
        f"GROUP BY 1 ORDER BY n DESC, status"
    ).table.to_pylist()


def failures(catalog: Any, limit: int | None = 20) -> list[dict[str, Any]]:
    """The commonest (status, error) pairs among failed rows, with an example key each (all of
    them when `limit` is None)."""
    return catalog.query(
        f"SELECT {S.STATUS} AS status, {S.ERROR} AS error, "
        f"count(*) AS n, min({S.KEY}) AS example_key "
        f"FROM {TABLE} WHERE {S.STATUS} IS DISTINCT FROM '{S.STATUS_OK}' GROUP BY 1, 2 "
        f"ORDER BY n DESC, status, error" + ("" if limit is None else f" LIMIT {int(limit)}")
    ).table.to_pylist()
