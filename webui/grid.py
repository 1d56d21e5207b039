"""The result grid every page shows (Search, SQL, Explore, Subset, Concepts): dense thumbnails
sized by a slider, caption and scores on hover and in one short line, a lightbox stepped with
←/→ (Esc closes), multi-select, and 👍/👎/skip on the keys 1/2/3.

It is a Streamlit v2 component (`webui/grid/grid.js` and `grid.css`, no build step, works
offline) drawn in the page itself, so a label or a selection is shown at once in the browser;
what it sends back (the labels given, "send to Subset", "use as labels") reaches Python as
component state, inside a `st.fragment` where the page puts one, so no full page rerun.
"""

from __future__ import annotations

import base64
import json
import logging
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import streamlit as st

from collection import schema as S
from indices.search import PUNSAFE_MAX, PWATERMARK_MAX
from webui import labelling, state
from webui.thumbs import THUMB_SIZE, Thumb, thumbnails

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent / "grid"
_GRID = st.components.v2.component(
    "sieve_grid",
    css=(HERE / "grid.css").read_text(),
    js=(HERE / "grid.js").read_text(),
)
#: the default thumbnail width in px: 8 a row in the main column at a 1,400 px wide window
THUMB_PX = 112
#: what "Send to Subset" leaves for the Subset page: {"path", "keys", "source"}
SUBSET_INBOX = state.SUBSET_INBOX
NOTICE = "grid_notice"
#: a text→image result is flagged weak under this quantile of the collection's own image–caption
#: similarity; bench.webui's `weak_flag` measures how it separates real queries from nonsense
WEAK_QUANTILE = 0.05
#: score columns shown on a card, with their short labels
CARD_SCORES = (
    (S.CLIP_SIMILARITY, "clip"),
    (S.PUNSAFE, "nsfw"),
    (S.PWATERMARK, "wm"),
    (S.PTOXIC, "toxic"),
)


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
    """'similarity 0.812 · clip 0.74 · nsfw 0.00 · wm 0.03': a card's scores (hover, lightbox)."""
    parts = [f"similarity {row['similarity']:.3f}"] if row.get("similarity") is not None else []
    if row.get("score") is not None:
        parts.append(f"concept {row['score']:.3f}")
    parts += [
        f"{label} {row[col]:.2f}"
        for col, label in CARD_SCORES
        if isinstance(row.get(col), (int, float))
    ]
    return " · ".join(parts)


def _safe(value: Any) -> Any:
    """A metadata value as JSON can carry it (numbers and text as they are, the rest as text)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if hasattr(value, "item"):  # numpy scalar
        return _safe(value.item())
    return str(value)


def weak_flags(sims: Sequence[float | None], weak_below: float | None) -> list[bool]:
    """Which results a page flags weak: those under `weak_below`, and only when the page's best
    is under it too. A page whose best result clears the bar holds real matches and the
    collection's next best below them say nothing bad of the query (flagging them marked half
    of real queries' top 20); a page where nothing clears it is the query's failure."""
    known = [s for s in sims if s is not None]
    if weak_below is None or not known or max(known) >= weak_below:
        return [False] * len(sims)
    return [s is not None and s < weak_below for s in sims]


def items(rows: Sequence[dict[str, Any]], weak_below: float | None = None) -> list[dict[str, Any]]:
    """The grid's cards: thumbnail as a data URL (or why there is none), caption, scores line,
    the weak flag (`weak_flags`), and every column for the lightbox."""
    thumbs = row_thumbnails(rows)
    weak = weak_flags([row.get("similarity") for row in rows], weak_below)
    out = []
    for row, thumb, flag in zip(rows, thumbs, weak):
        out.append(
            {
                "id": _safe(row.get("id")),
                "key": str(row.get(S.KEY) or row.get("id")),
                "src": "data:image/jpeg;base64," + base64.b64encode(thumb.jpeg).decode()
                if thumb.jpeg is not None
                else None,
                "why": thumb.why,
                "caption": str(row.get(S.CAPTION) or ""),
                "line": scores_line(row),
                "weak": flag,
                "details": {k: _safe(v) for k, v in row.items()},
            }
        )
    return out


def show(
    rows: Sequence[dict[str, Any]],
    key: str,
    path: str,
    mode: str = "browse",
    weak_below: float | None = None,
    source: str = "",
    extra: dict[str, tuple[str, Callable[[list[str]], None]]] | None = None,
) -> None:
    """Draw `rows` as the grid. mode "label": keys 1/2/3 label the concept being built
    (`webui.labelling`); "browse": select, then use as labels or send to Subset. `extra`:
    more toolbar buttons, {kind: (label, callback(keys))}, keys the selection or the card
    under the cursor."""
    extra = extra or {}
    labels = labelling.labels_of(path) if mode == "label" else {}
    data = {
        "items": items(rows, weak_below),
        "mode": mode,
        "labels": labels,
        "version": labelling.version(path),
        "size": THUMB_PX,
        "extra": [[kind, label] for kind, (label, _) in extra.items()],
    }
    _GRID(
        key=key,
        data=data,
        default={"labels": {}},
        on_labels_change=partial(_on_labels, key, path),
        on_action_change=partial(_on_action, key, path, source, extra),
    )


def _on_labels(key: str, path: str) -> None:
    given = (st.session_state.get(key) or {}).get("labels") or {}
    labelling.apply(path, given)


def _on_action(key: str, path: str, source: str, extra: dict[str, tuple[str, Callable]]) -> None:
    action = (st.session_state.get(key) or {}).get("action")
    if not isinstance(action, dict) or not isinstance(action.get("keys"), list):
        return
    keys = [str(k) for k in action["keys"]]
    kind = action.get("kind")
    if kind in extra:
        extra[kind][1](keys)
    elif kind == "subset":
        st.session_state[SUBSET_INBOX] = {"path": path, "keys": keys, "source": source}
        st.session_state[NOTICE] = f"{len(keys)} sample(s) sent to the Subset page."
    elif kind in ("pos", "neg"):
        value = labelling.POSITIVE if kind == "pos" else labelling.NEGATIVE
        labelling.apply(path, {k: [value, None] for k in keys})
        name = labelling.name_of(path)
        st.session_state[NOTICE] = f"{len(keys)} label(s) added to concept {name}."


def notice() -> None:
    """What the last grid action did, said once under the grid."""
    said = st.session_state.pop(NOTICE, None)
    if said:
        st.success(said)


def hidden_counts(
    rows: list[dict[str, Any]], unfiltered: list[dict[str, Any]], safe: bool, hide_wm: bool
) -> dict[str, int]:
    """How many of the unfiltered top k the toggles and filter hid, by cause: safe mode
    (punsafe), watermark (pwatermark), and near-duplicates or the SQL filter (the rest)."""
    shown = {r["id"] for r in rows}
    out = {"safe mode": 0, "watermark": 0, "dedup / filter": 0}
    for r in unfiltered:
        if r["id"] in shown:
            continue
        if safe and (r.get(S.PUNSAFE) or 0) > PUNSAFE_MAX:
            out["safe mode"] += 1
        elif hide_wm and (r.get(S.PWATERMARK) or 0) > PWATERMARK_MAX:
            out["watermark"] += 1
        else:
            out["dedup / filter"] += 1
    return {k: v for k, v in out.items() if v}


def collection_weak_threshold(catalog: Any, quantile: float = WEAK_QUANTILE) -> float | None:
    """The similarity under which a text→image result is weak: the `quantile` of what the
    collection's images score against their own captions (`clip_similarity`: what a true
    match scores). None when the collection has no such column. `catalog`: a
    `curation.catalog.Catalog`, sandboxed or not."""
    if S.CLIP_SIMILARITY not in catalog.columns:
        return None
    sql = f"SELECT quantile_cont({S.CLIP_SIMILARITY}, {float(quantile)}) AS q FROM samples"
    table = catalog.query(sql).table
    value = table.column("q")[0].as_py() if table.num_rows else None
    return float(value) if value is not None else None


@st.cache_data(max_entries=16, show_spinner=False)
def weak_threshold(path: str, version: tuple) -> float | None:
    """`collection_weak_threshold` of a collection as loaded now, cached per build."""
    return collection_weak_threshold(state.loaded(path, version[0]).catalog())


def cards_of(element: Any) -> list[dict[str, Any]]:
    """The cards a grid element carries (its data as JSON): for tests and benchmarks."""
    return json.loads(element.proto.json).get("items", [])
