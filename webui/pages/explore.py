"""Explore: rows and failures by status, and histograms of the scores, sizes and caption length.
Every figure is one aggregate query in DuckDB through the sandboxed catalog (`curation.stats`,
also `python -m curation.stats`): no row is loaded into the page."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import pandas as pd
import streamlit as st

from curation import schema as S
from curation import stats
from webui import components, state


@st.cache_data(max_entries=64, show_spinner=False, ttl=60)
def _status(path: str, signature: tuple) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    cat = state.loaded(path, signature).catalog()
    return stats.status_counts(cat), stats.failures(cat)


@st.cache_data(max_entries=256, show_spinner=False, ttl=60)
def _histogram(path: str, signature: tuple, column: str, bins: int) -> dict[str, Any]:
    return asdict(stats.histogram(state.loaded(path, signature).catalog(), column, bins))


def render() -> None:
    st.title("Explore")
    cur = components.collection_sidebar()
    if not cur.health.queryable:
        state.show_problems(cur.health)
        return
    sig = cur.health.signature
    with st.spinner("Counting…"):
        try:
            counts, failed = _status(cur.path, sig)
        except ValueError as exc:  # SqlError: the sandbox refused or timed out
            st.error(str(exc))
            return
    total = sum(r["n"] for r in counts)
    ok = sum(r["n"] for r in counts if r["status"] == S.STATUS_OK)
    m1, m2, m3 = st.columns(3)
    m1.metric("Rows", f"{total:,}")
    m2.metric("Embedded (ok)", f"{ok:,}")
    m3.metric("Failed", f"{total - ok:,}")
    c1, c2 = st.columns([1, 2])
    c1.dataframe(pd.DataFrame(counts), hide_index=True)
    if failed:
        c2.dataframe(pd.DataFrame(failed), hide_index=True)
    else:
        c2.caption("No failed rows.")

    st.subheader("Histograms")
    columns = cur.catalog().columns
    available = []
    for name in stats.HISTOGRAMS:
        try:
            stats.expression(name, columns)
            available.append(name)
        except ValueError:  # an unscored collection has no punsafe column, say
            continue
    h1, h2 = st.columns([3, 1])
    chosen = h1.multiselect("Columns", available, default=available, key="explore_columns")
    bins = h2.slider("Bins", 5, 100, 30, key="explore_bins")
    missing = [n for n in stats.HISTOGRAMS if n not in available]
    if missing:
        st.caption(f"Not in this collection: {', '.join(missing)}")
    grid = st.columns(2)
    for i, name in enumerate(chosen):
        try:
            hist = _histogram(cur.path, sig, name, bins)
        except ValueError as exc:
            grid[i % 2].error(f"{name}: {exc}")
            continue
        with grid[i % 2]:
            if not hist["counts"]:
                st.caption(f"{name}: no values")
                continue
            st.altair_chart(components.histogram_chart(hist, name), width="stretch")
            if hist["missing"]:
                st.caption(f"{hist['missing']:,} rows without a value")


render()
