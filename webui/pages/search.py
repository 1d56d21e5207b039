"""Search: a text query (weighted and negative prompts), an image upload or path (a file under
the app's data roots, `webui.roots`), or "more like this" on any result; image or text index, k,
safe mode, hidden near-duplicates and watermarked images, a SQL filter. Results as a thumbnail
grid; downloads as clip front's clipsubset.json or parquet, the takedown list checked again
when they are made. The search itself is `indices.query.query` (also `python -m indices.query`)."""

from __future__ import annotations

from typing import Any

import streamlit as st

from collection import schema as S
from indices.query import APPROXIMATE_NOTE, MAX_RESULTS, results_json, results_parquet
from pipelines.decode import DEFAULT_MAX_PIXELS, decode_image
from webui import components, grid, searches, state
from webui.roots import read_image

KIND = "search_kind"  # which input the user touched last: text / upload / path / like
LIKE = "search_like"  # the result "more like this" was pressed on: {"id", "key", "caption"}


def _kind(kind: str) -> None:
    st.session_state[KIND] = kind


def _like(row: dict[str, Any]) -> None:
    st.session_state[LIKE] = {"id": row["id"], "key": row.get("key"), "caption": row.get("caption")}
    st.session_state[KIND] = "like"


def _like_key(rows: list[dict[str, Any]], keys: list[str]) -> None:
    """The grid's "More like this" (on the card under the cursor, or the first selected)."""
    found = next((r for r in rows if str(r.get(S.KEY)) in keys[:1]), None)
    if found is not None:
        _like(found)


def _clear_like() -> None:
    st.session_state.pop(LIKE, None)
    st.session_state[KIND] = "text"


def _input() -> tuple[str, Any] | None:
    """(kind, value) of the query to run: the last input touched, else whichever is filled;
    None when there is nothing to search for. Bad images are reported here."""
    text = st.session_state.get("search_text", "").strip()
    upload = st.session_state.get("search_upload")
    path = st.session_state.get("search_path", "").strip()
    like = st.session_state.get(LIKE)
    filled = {"text": text or None, "upload": upload, "path": path or None, "like": like}
    kind = st.session_state.get(KIND)
    if not filled.get(kind):
        kind = next((k for k in ("like", "upload", "path", "text") if filled[k]), None)
    if kind is None:
        return None
    if kind == "text":
        return "text", text
    if kind == "like":
        return "like", like["id"]
    if kind == "upload":
        name, data = upload.name, upload.getvalue()
    else:
        name = path
        try:
            data = read_image(path, state.data_roots())
        except ValueError as exc:  # outside the roots (one message whether or not it exists)
            st.error(str(exc))
            return None
    image, _, error = decode_image(data, DEFAULT_MAX_PIXELS)
    if image is None:
        st.error(f"{name}: not an image Sieve can read ({error})")
        return None
    return "image", data


def _downloads(cur: state.Current, run: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """clip front's clipsubset.json and parquet of up to MAX_RESULTS results, made on click."""
    c1, c2, c3 = st.columns([2, 1, 1], vertical_alignment="bottom")
    n = c1.number_input(
        "Results to download", 1, MAX_RESULTS, value=len(rows), key="search_download_n"
    )

    def fetch() -> list[dict[str, Any]]:
        """The rows to download, made on click: rows listed since the page drew are left out."""
        found = rows[:n] if n <= len(rows) else _fetch_more()
        visible = cur.searcher().visible([r["id"] for r in found])
        return [r for r, ok in zip(found, visible) if ok]

    def _fetch_more() -> list[dict[str, Any]]:
        return searches.search(
            cur.path,
            run["version"],
            run["kind"],
            run["value"],
            int(n),
            run["modality"],
            run["filters"],
            run["safe"],
            run["dedup"],
            run["hide_wm"],
        )

    c2.download_button(
        "clipsubset.json",
        data=lambda: results_json(fetch()),
        file_name="clipsubset.json",
        mime="application/json",
        key="search_download_json",
    )
    c3.download_button(
        "parquet",
        data=lambda: results_parquet(fetch()),
        file_name="results.parquet",
        mime="application/octet-stream",
        key="search_download_parquet",
    )


def render() -> None:
    st.title("Search")
    cur = components.collection_sidebar()
    if not cur.health.searchable:
        state.show_problems(
            cur.health,
            "Search needs an index; the SQL and Explore pages work on metadata alone."
            if cur.health.queryable
            else "",
        )
        return
    q1, q2 = st.columns([3, 2])
    q1.text_input(
        "Text query",
        key="search_text",
        on_change=_kind,
        args=("text",),
        placeholder="a red circle  ·  weighted: a red star:1|blurry:-0.5",
        help="Weighted prompts as in subset specs: "
        "`text:weight` joined by `|`; negative weights push away.",
    )
    q2.file_uploader("…or an image", key="search_upload", on_change=_kind, args=("upload",))
    q1.text_input("…or an image path", key="search_path", on_change=_kind, args=("path",))
    # the toggles stacked in one column: side by side their labels are cut at 1,024 px
    o1, o2, o3 = st.columns([1.2, 1, 1.6])
    modality = o1.radio(
        "Index",
        cur.health.indices,
        key="search_modality",
        horizontal=True,
        format_func=lambda m: f"{m}s",
    )
    k = o2.number_input("k", 1, 500, 20, key="search_k")
    safe = o3.toggle("Safe mode", value=True, key="search_safe", help="hide punsafe > 0.5")
    dedup = o3.toggle("Hide near-duplicates", value=True, key="search_dedup")
    hide_wm = o3.toggle(
        "Hide watermarked", value=False, key="search_hide_wm", help="hide pwatermark > 0.8"
    )
    filters = st.text_input(
        "SQL filter",
        key="search_filter",
        placeholder="clip_similarity > 0.3 AND width >= 64",
        help="A WHERE clause over the candidates' metadata columns and `id` (sandboxed).",
    ).strip()

    like = st.session_state.get(LIKE)
    if like and not cur.searcher().visible([like["id"]])[0]:  # listed since it was clicked
        _clear_like()
        like = None
    if like and st.session_state.get(KIND) == "like":
        c1, c2 = st.columns([5, 1])
        c1.info(f"More like {like['key']}: {components.escape(like.get('caption') or '')}")
        c2.button("Clear", key="search_clear_like", on_click=_clear_like)
    chosen = _input()
    if chosen is None:
        st.caption("Type a query, upload an image, or give an image path.")
        return
    kind, value = chosen
    run = {
        "version": searches.version(cur),
        "kind": kind,
        "value": value,
        "modality": modality,
        "filters": filters,
        "safe": safe,
        "dedup": dedup,
        "hide_wm": hide_wm,
    }
    try:
        rows = searches.search(
            cur.path, run["version"], kind, value, int(k), modality, filters, safe, dedup, hide_wm
        )
    except (
        ValueError
    ) as exc:  # QueryError (a bad filter, a malformed prompt), SqlError, CollectionError
        st.error(str(exc))
        return
    if not rows:
        st.info(
            "No results: nothing passes these filters. Loosen the SQL filter or turn a toggle off."
        )
        return
    how = "" if getattr(rows, "exact", True) else f" · {APPROXIMATE_NOTE}"
    note = f"{len(rows)} results from the {modality} index{how}"
    if safe or dedup or hide_wm or filters:
        unfiltered = searches.search(
            cur.path, run["version"], kind, value, int(k), modality, "", False, False, False
        )
        hidden = grid.hidden_counts(rows, unfiltered, safe, hide_wm)
        if hidden:
            said = ", ".join(f"{n} by {why}" for why, n in hidden.items())
            note += f" · of the top {len(unfiltered)}, hidden: {said}"
    weak_below = None
    if kind == "text" and modality == S.MODALITY_IMAGE:
        weak_below = grid.weak_threshold(cur.path, run["version"])
        weak = sum(grid.weak_flags([r.get("similarity") for r in rows], weak_below))
        if weak:
            note += (
                f" · weak: no result reaches {weak_below:.3f}, what 95% of the "
                "collection's images score against their own captions"
            )
    st.caption(note)
    grid.show(
        rows,
        key="search-grid",
        path=cur.path,
        weak_below=weak_below,
        source=f"search: {value if kind == 'text' else kind}",
        extra={"like": ("More like this", lambda keys: _like_key(rows, keys))},
    )
    grid.notice()
    _downloads(cur, run, rows)


render()
