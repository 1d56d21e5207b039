"""Pieces the pages share: the collection sidebar, the result grid (`webui.grid`), histograms.

Presentation only: the rows come from the search, SQL, concept and subset functions.
"""

from __future__ import annotations

import os
import re
from typing import Any, Sequence

import altair as alt
import pandas as pd
import streamlit as st

from webui import grid, state
from webui.roots import OutsideRoots, inside_roots

_MARKDOWN = re.compile(r"([\\`*_\[\]#|<>~$])")


def _open_another() -> None:
    typed = st.session_state.get("open_path", "").strip()
    if not typed:
        return
    try:  # only under the data roots, and the refusal says nothing of what exists
        path = inside_roots(typed, state.data_roots(), "Open another collection")
    except OutsideRoots as exc:
        st.session_state["open_error"] = str(exc)
        return
    if not state.is_folder(path):
        st.session_state["open_error"] = f"{path}: no such folder"
        return
    st.session_state.pop("open_error", None)
    if path not in st.session_state[state.COLLECTIONS]:
        st.session_state[state.COLLECTIONS].append(path)
    st.session_state[state.CURRENT] = path
    st.session_state["open_path"] = ""


def _label(path: str) -> str:
    parent, name = os.path.split(path.rstrip("/"))
    return f"{os.path.basename(parent)}/{name}" if parent else name


def collection_sidebar() -> state.Current:
    """The sidebar every page starts with (pick a collection, open another, what it holds);
    returns the chosen collection."""
    state.open_collections([])
    paths = st.session_state[state.COLLECTIONS]
    if st.session_state.get(state.CURRENT) not in paths:
        st.session_state[state.CURRENT] = paths[0]
    with st.sidebar:
        st.selectbox("Collection", paths, key=state.CURRENT, format_func=_label)
        st.text_input(
            "Open another collection",
            key="open_path",
            placeholder="/path/to/collection",
            on_change=_open_another,
        )
        if st.session_state.get("open_error"):
            st.error(st.session_state["open_error"])
        cur = state.current()
        if cur.health.parts:
            st.caption(
                f"{cur.health.parts} part(s) · indices: {', '.join(cur.health.indices) or 'none'}"
            )
    return cur


def visible_points(points: pd.DataFrame, searcher: Any) -> pd.DataFrame:
    """The map points (an `id` column of global ids) a page may draw: the takedown list is
    checked for a change first, and every point it names is dropped, key, hover and all."""
    return points[searcher.visible(points["id"].to_numpy())]


def escape(text: Any) -> str:
    """Text shown as markdown exactly as written (captions are untrusted: no links, no markup)."""
    return _MARKDOWN.sub(r"\\\1", str(text))


def result_grid(
    rows: Sequence[dict[str, Any]],
    key: str,
    columns: int | None = None,
    source: str = "",
) -> None:
    """Rows as the shared result grid (`webui.grid`): thumbnails as dense as the slider asks
    (`columns` is no longer used: the browser fits as many a row as the width allows), a
    lightbox, multi-select, "use as labels" and "send to Subset"."""
    grid.show(rows, key=key, path=st.session_state.get(state.CURRENT, ""), source=source)


def histogram_chart(hist: dict[str, Any], title: str) -> alt.Chart:
    """An Altair bar chart of a `curation.stats.Histogram` (as a dict): one bar per bin."""
    edges, counts = hist["edges"], hist["counts"]
    frame = pd.DataFrame({"from": edges[:-1], "to": edges[1:], "rows": counts})
    return (
        alt.Chart(frame, title=title)
        .mark_bar()
        .encode(
            x=alt.X("from:Q", bin="binned", title=title),
            x2="to:Q",
            y=alt.Y("rows:Q", title="rows"),
            tooltip=["from", "to", "rows"],
        )
        .properties(height=180)
    )
