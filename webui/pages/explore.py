"""Explore: rows and failures by status, histograms of the scores, sizes and caption length, and
the embedding map.

Every count is one aggregate query in DuckDB through the sandboxed catalog, and the histograms
two whatever their number (`curation.stats`, also `python -m curation.stats`): no row is
loaded into the page. The figures at the page's opening settings are made in the background as
the collection opens (`state.Loaded.overview`), so opening the page scans nothing. The map
(`python -m curation.map`) is drawn from a sample of its points, coloured by a chosen column,
less every point the takedown list names (checked on every rerun: the map file predates the
list); a box or lasso selection lists the samples inside (`curation.map.region_mask`, over every
point) and can become the Subset page's region clause; with "Thumbnails on hover" the map is
drawn from fewer points, each carrying its thumbnail in its tooltip. A click or a drag on a
histogram selects a range of bins, which becomes a `where` clause of the Subset page."""

from __future__ import annotations

import base64
import os
from dataclasses import asdict
from typing import Any

import altair as alt
import numpy as np
import pandas as pd
import plotly.express as px
import streamlit as st

from collection import schema as S
from curation import stats
from curation.map import read_map, region_mask
from webui import components, state
from webui.draft import REGION, add_clause, region_label
from webui.picks import PICK, picked_range, selectable_histogram, where_of
from webui.thumbs import thumbnails

#: points drawn on the map at most (a seeded sample); a selection counts every point
MAP_POINTS = 20_000
#: samples listed from a selection
LISTED = 20
#: points drawn when each carries its thumbnail (the page sends them all to the browser)
HOVER_POINTS = 1_500
#: longest side of a hover thumbnail, in pixels
HOVER_THUMB = 64
#: the metadata columns an image is read back by (`collection.images`)
IMAGE_COLUMNS = (S.SOURCE_SHARD, S.KEY, S.SOURCE_OFFSET, S.SOURCE_SIZE, S.SHA256)
#: columns worth colouring by, besides the cluster (those the collection has)
MAP_COLOURS = (S.CLIP_SIMILARITY, S.PWATERMARK, S.PUNSAFE, S.PTOXIC, S.WIDTH, S.HEIGHT, S.LANGUAGE)


# keyed on the collection's parts and on its takedown list (`insight`: the sandbox hides what
# the list names), so every session after the first opens Explore from the cache
@st.cache_data(max_entries=64, show_spinner=False)
def _status(
    path: str, signature: tuple, insight: tuple
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    cat = state.loaded(path, signature).catalog()
    return stats.status_counts(cat), stats.failures(cat)


@st.cache_data(max_entries=256, show_spinner=False)
def _histograms(
    path: str, signature: tuple, insight: tuple, columns: tuple[str, ...], bins: int
) -> dict[str, dict[str, Any]]:
    """The chosen columns' histograms, all in two scans of the collection (`stats.histograms`)."""
    cat = state.loaded(path, signature).catalog()
    return {h.column: asdict(h) for h in stats.histograms(cat, columns, bins)}


@st.cache_data(max_entries=16, show_spinner=False)
def _map_points(
    path: str, signature: tuple, insight: tuple, modality: str, colour: str
) -> pd.DataFrame:
    """A seeded sample of the map's points (id, key, x, y, the colour column), read anew when the
    map is remade (`insight`)."""
    table = read_map(path, modality)
    n = table.num_rows
    ids = (
        np.arange(n)
        if n <= MAP_POINTS
        else np.sort(np.random.default_rng(0).choice(n, MAP_POINTS, replace=False))
    )
    frame = table.take(ids).to_pandas()
    frame.insert(0, "id", ids)
    if colour != S.MAP_CLUSTER:
        rows = state.loaded(path, signature).searcher().rows
        frame[colour] = rows.take(ids, [colour]).column(colour).to_numpy(zero_copy_only=False)
    else:
        frame[colour] = frame[colour].astype(str)
    return frame


@st.cache_data(max_entries=16, show_spinner=False)
def _hover_images(path: str, signature: tuple, ids: tuple[int, ...]) -> list[str | None]:
    """Small JPEG thumbnails of rows as data URLs (None where the image cannot be read)."""
    rows = state.loaded(path, signature).searcher().rows
    cols = [c for c in IMAGE_COLUMNS if c in rows.column_names]
    found = thumbnails(rows.take(np.asarray(ids, dtype=np.int64), cols).to_pylist(), HOVER_THUMB)
    return [
        "data:image/jpeg;base64," + base64.b64encode(t.jpeg).decode() if t.jpeg else None
        for t in found
    ]


def hover_map(cur: state.Current, points: pd.DataFrame, colour: str, modality: str) -> Any:
    """The map as an Altair chart whose tooltips show each point's thumbnail (vega-tooltip draws
    an `image` field as the picture), from a seeded sample of HOVER_POINTS; a drag selects a box."""
    if len(points) > HOVER_POINTS:
        points = points.sample(HOVER_POINTS, random_state=0).sort_values("id")
    points = points.assign(
        image=_hover_images(cur.path, cur.health.signature, tuple(int(i) for i in points["id"]))
    )
    brush = alt.selection_interval(name="box", encodings=["x", "y"])
    chart = (
        alt.Chart(points)
        .mark_circle(size=30)
        .encode(
            x=alt.X(f"{S.MAP_X}:Q", title=None),
            y=alt.Y(f"{S.MAP_Y}:Q", title=None),
            color=alt.Color(colour),
            tooltip=["image", S.KEY, colour],
        )
        .add_params(brush)
        .properties(height=520)
    )
    event = st.altair_chart(chart, key="explore_hover_map", on_select="rerun", width="stretch")
    box = ((event or {}).get("selection") or {}).get("box") or {}
    if box.get(S.MAP_X) and box.get(S.MAP_Y):
        (x0, x1), (y0, y1) = sorted(box[S.MAP_X]), sorted(box[S.MAP_Y])
        return {"modality": modality, "rect": [x0, y0, x1, y1]}
    return None


def _selected(event: Any, modality: str) -> dict[str, Any] | None:
    """The map region of a plotly selection event: its box as a rect, its lasso as a polygon."""
    sel = (event or {}).get("selection") or {}
    if sel.get("box"):
        box = sel["box"][0]
        return {
            "modality": modality,
            "rect": [min(box["x"]), min(box["y"]), max(box["x"]), max(box["y"])],
        }
    if sel.get("lasso"):
        lasso = sel["lasso"][0]
        return {
            "modality": modality,
            "polygon": [[float(x), float(y)] for x, y in zip(lasso["x"], lasso["y"])],
        }
    return None


def _use_region(path: str, region: dict[str, Any]) -> None:
    error = add_clause(path, "region", region)
    st.session_state["explore_region_note"] = error or "Added to the Subset page's clauses."


def map_section(cur: state.Current) -> None:
    """The embedding map with box/lasso selection, or the command that makes it."""
    st.subheader("Map")
    made = [m for m in cur.health.embeddings if os.path.exists(S.InsightLayout(cur.path).map(m))]
    if not made:
        st.info(
            f"No map yet. Make it with `python -m curation.map {cur.path}` "
            "(UMAP of the image embeddings; `--modality text` for the captions')."
        )
        return
    if not cur.health.searchable:
        state.show_problems(
            cur.health, "The map's samples are listed from the search index's rows."
        )
        return
    columns = cur.searcher().rows.column_names
    c1, c2 = st.columns([1, 2])
    modality = c1.radio("Embeddings", made, key="explore_map_modality", horizontal=True)
    colour = c2.selectbox(
        "Colour by",
        [S.MAP_CLUSTER, *(c for c in MAP_COLOURS if c in columns)],
        key="explore_colour",
    )
    with st.spinner("Reading the map…"):
        points = _map_points(
            cur.path, cur.health.signature, state.insight_version(cur.path), modality, colour
        )
    points = components.visible_points(points, cur.searcher())
    if st.toggle(
        "Thumbnails on hover",
        key="explore_hover",
        help=f"Draw {HOVER_POINTS:,} points, each showing its image on hover (box selection only)",
    ):
        region = hover_map(cur, points, colour, modality)
    else:
        fig = px.scatter(
            points,
            x=S.MAP_X,
            y=S.MAP_Y,
            color=colour,
            hover_data={"id": True, S.KEY: True},
            render_mode="webgl",
            height=520,
        )
        fig.update_traces(marker={"size": 5})
        fig.update_layout(dragmode="lasso", margin={"l": 0, "r": 0, "t": 10, "b": 0})
        event = st.plotly_chart(
            fig, key="explore_map", on_select="rerun", selection_mode=("box", "lasso")
        )
        region = _selected(event, modality)
    if region is not None:
        st.session_state[REGION] = region
    region = st.session_state.get(REGION)
    if not region or region.get("modality") != modality:
        st.caption("Draw a box or a lasso on the map to list the samples inside.")
        return
    table = read_map(cur.path, modality)
    try:
        inside = np.nonzero(region_mask(table, region.get("rect"), region.get("polygon")))[0]
    except ValueError as exc:
        st.error(f"map selection: {exc}")
        return
    c1, c2, c3 = st.columns([3, 1, 1], vertical_alignment="center")
    c1.markdown(f"**{len(inside):,} samples** in the {region_label(region)}")
    c2.button(
        "Use as a region clause",
        key="explore_use_region",
        on_click=_use_region,
        args=(cur.path, region),
        disabled=not len(inside),
    )
    c3.button(
        "Clear selection",
        key="explore_clear_region",
        on_click=lambda: st.session_state.pop(REGION, None),
    )
    if st.session_state.get("explore_region_note"):
        st.info(st.session_state.pop("explore_region_note"))
    if len(inside):
        first = inside[: LISTED * 4]  # records() leaves listed rows out: look a little further
        first = first[cur.searcher().visible(first)][:LISTED]
        components.result_grid(cur.searcher().records(first.tolist()), key="explore", columns=5)


def _use_range(path: str, clause: str) -> None:
    error = add_clause(path, "where", clause)
    st.session_state["explore_range_note"] = error or f"Added `{clause}` to the Subset page."
    if error is None:
        st.session_state.pop(PICK, None)


def range_section(cur: state.Current) -> None:
    """The picked histogram range, as the where clause it would add to the Subset page."""
    pick = st.session_state.get(PICK)
    if st.session_state.get("explore_range_note"):
        st.info(st.session_state.pop("explore_range_note"))
    if not pick:
        st.caption("Click a bar or drag across bars to pick a range for the Subset page.")
        return
    clause = where_of(pick)
    c1, c2, c3 = st.columns([4, 1, 1], vertical_alignment="center")
    c1.markdown(f"**~{pick['rows']:,} rows** · `{clause}`")
    c2.button(
        "Add as a where clause",
        key="explore_use_range",
        on_click=_use_range,
        args=(cur.path, clause),
    )
    c3.button(
        "Clear range", key="explore_clear_range", on_click=lambda: st.session_state.pop(PICK, None)
    )


def render() -> None:
    st.title("Explore")
    cur = components.collection_sidebar()
    if not cur.health.queryable:
        state.show_problems(cur.health)
        return
    sig, insight = cur.health.signature, state.insight_version(cur.path)
    with st.spinner("Counting…"):
        # made in the background since the collection opened, at the page's opening settings
        opening = cur.resources.overview(insight) if cur.resources is not None else None
        try:
            counts, failed = (
                (opening["status"], opening["failures"])
                if opening is not None
                else _status(cur.path, sig, insight)
            )
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
    bins = h2.slider("Bins", 5, 100, state.EXPLORE_BINS, key="explore_bins")
    missing = [n for n in stats.HISTOGRAMS if n not in available]
    if missing:
        st.caption(f"Not in this collection: {', '.join(missing)}")
    grid = st.columns(2)
    made = {h["column"]: h for h in opening["histograms"]} if opening is not None else {}
    with st.spinner("Counting…"):
        try:
            hists = (
                {c: made[c] for c in chosen}
                if bins == state.EXPLORE_BINS and all(c in made for c in chosen)
                else _histograms(cur.path, sig, insight, tuple(chosen), bins)
            )
        except ValueError as exc:  # SqlError: the sandbox refused or timed out
            st.error(f"histograms: {exc}")
            hists = {}
    for i, name in enumerate(c for c in chosen if c in hists):
        hist = hists[name]
        with grid[i % 2]:
            if not hist["counts"]:
                st.caption(f"{name}: no values")
                continue
            event = st.altair_chart(
                selectable_histogram(hist, name),
                key=f"explore_hist_{name}",
                on_select="rerun",
                width="stretch",
            )
            picked = picked_range(hist, name, ((event or {}).get("selection") or {}))
            if picked is not None:
                st.session_state[PICK] = picked
            if hist["missing"]:
                st.caption(f"{hist['missing']:,} rows without a value")
    range_section(cur)
    map_section(cur)


render()
