"""Chart selections as subset clauses: a click or a drag on an Explore histogram picks a range
of bins (snapped to their edges), and the range becomes a `where` condition on the column's
expression (`curation.stats.HISTOGRAMS`), which the Subset page then dry-runs like any other.
"""

from __future__ import annotations

from typing import Any

import altair as alt
import pandas as pd

from curation import stats

#: the histogram range picked last: {column, low, high, rows, last}, offered as a where clause
PICK = "explore_hist_pick"


def selectable_histogram(hist: dict[str, Any], name: str) -> alt.Chart:
    """The histogram's bars, where a click picks a bin and a drag a range of bins."""
    edges, counts = hist["edges"], hist["counts"]
    frame = pd.DataFrame({"from": edges[:-1], "to": edges[1:], "rows": counts})
    brush = alt.selection_interval(name="range", encodings=["x"])
    click = alt.selection_point(name="bin", fields=["from", "to"])
    return (
        alt.Chart(frame, title=name)
        .mark_bar()
        .encode(
            x=alt.X("from:Q", bin="binned", title=name),
            x2="to:Q",
            y=alt.Y("rows:Q", title="rows"),
            opacity=alt.condition(click | brush, alt.value(1.0), alt.value(0.5)),
            tooltip=["from", "to", "rows"],
        )
        .add_params(brush, click)
        .properties(height=180)
    )


def picked_range(
    hist: dict[str, Any], name: str, selection: dict[str, Any]
) -> dict[str, Any] | None:
    """The bins a histogram selection covers, snapped to bin edges: {column, low, high, rows,
    last} (last: the range ends at the top edge, which the last bin includes); None if none."""
    edges = hist["edges"]
    lo = hi = None
    if (selection.get("range") or {}).get("from"):
        a, b = sorted(float(v) for v in selection["range"]["from"])
        lo = max(i for i in range(len(edges) - 1) if edges[i] <= a or i == 0)
        hi = min(i for i in range(1, len(edges)) if edges[i] >= b or i == len(edges) - 1)
    elif selection.get("bin"):
        picks = [p for p in selection["bin"] if "from" in p]
        if picks:
            starts = [
                min(range(len(edges) - 1), key=lambda i: abs(edges[i] - p["from"])) for p in picks
            ]
            lo, hi = min(starts), max(starts) + 1
    if lo is None or hi is None or hi <= lo:
        return None
    return {
        "column": name,
        "low": float(edges[lo]),
        "high": float(edges[hi]),
        "rows": int(sum(hist["counts"][lo:hi])),
        "last": hi == len(edges) - 1,
    }


def where_of(pick: dict[str, Any]) -> str:
    """The SQL condition of a picked histogram range (`curation.stats.HISTOGRAMS`' expression)."""
    expr = stats.HISTOGRAMS[pick["column"]]
    upper = "<=" if pick["last"] else "<"
    return f"{expr} >= {pick['low']!r} AND {expr} {upper} {pick['high']!r}"
