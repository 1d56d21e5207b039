"""Pieces the pages share: the thumbnail grid of result cards, their detail view, histograms.

Presentation only: the rows come from the search, SQL, concept and subset functions, and
the thumbnails from `webui.thumbs`.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Sequence

import altair as alt
import pandas as pd
import streamlit as st

from collection import schema as S
from webui import state
from webui.roots import OutsideRoots, inside_roots
from webui.thumbs import THUMB_SIZE, Thumb, thumbnails

#: score columns shown on a card, with their short labels
CARD_SCORES = (
    (S.CLIP_SIMILARITY, "clip"),
    (S.PUNSAFE, "nsfw"),
    (S.PWATERMARK, "wm"),
    (S.PTOXIC, "toxic"),
)
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


@st.cache_data(max_entries=256, show_spinner=False)
def cached_thumbnails(cells: tuple[tuple[Any, ...], ...], size: int = THUMB_SIZE) -> list[Thumb]:
    """Thumbnails of
    (source_shard, key, source_offset, source_size, sha256) cells, cached per set."""
    names = (S.SOURCE_SHARD, S.KEY, S.SOURCE_OFFSET, S.SOURCE_SIZE, S.SHA256)
    return thumbnails([dict(zip(names, c)) for c in cells], size)


def row_thumbnails(rows: Sequence[dict[str, Any]]) -> list[Thumb]:
    """The grid's thumbnails of result rows (read from their source shards, cached)."""
    cells = tuple(
        (
            r.get(S.SOURCE_SHARD),
            r.get(S.KEY),
            r.get(S.SOURCE_OFFSET),
            r.get(S.SOURCE_SIZE),
            r.get(S.SHA256),
        )
        for r in rows
    )
    return cached_thumbnails(cells)


def scores_line(row: dict[str, Any]) -> str:
    """'similarity 0.812 · clip 0.74 · nsfw 0.00 · wm 0.03': what a card shows under its caption."""
    parts = [f"similarity {row['similarity']:.3f}"] if row.get("similarity") is not None else []
    if row.get("score") is not None:
        parts.append(f"concept {row['score']:.3f}")
    parts += [
        f"{label} {row[col]:.2f}"
        for col, label in CARD_SCORES
        if isinstance(row.get(col), (int, float))
    ]
    return " · ".join(parts)


def result_grid(
    rows: Sequence[dict[str, Any]],
    key: str,
    columns: int = 5,
    actions: Callable[[dict[str, Any], str], None] | None = None,
) -> None:
    """Rows as cards: thumbnail, caption, similarity and scores, a Details popover with every
    metadata column, and `actions(row, key)` drawing the card's own buttons."""
    thumbs = row_thumbnails(rows)
    for start in range(0, len(rows), columns):
        cells = st.columns(columns)
        for cell, row, thumb in zip(
            cells, rows[start : start + columns], thumbs[start : start + columns]
        ):
            with cell.container(border=True):
                if thumb.jpeg is not None:
                    st.image(thumb.jpeg, width="stretch")
                else:
                    st.caption(f"no image: {escape(thumb.why)}")
                st.markdown(escape(row.get(S.CAPTION) or "(no caption)"))
                st.caption(scores_line(row))
                card = f"{key}-{row.get('id', start)}"
                if actions is not None:
                    actions(row, card)
                with st.popover("Details", width="stretch"):
                    st.json({k: v for k, v in row.items()}, expanded=True)


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
