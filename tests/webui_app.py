"""Helpers the web UI's AppTest files share: run the app (on a page, with session state), read
the result cards and the messages on the page."""

from __future__ import annotations

import json
from pathlib import Path

from streamlit.testing.v1 import AppTest

REPO = Path(__file__).resolve().parent.parent
APP = str(REPO / "webui" / "app.py")
TIMEOUT = 300  # the first run in a process loads CLIP and FAISS in the background


def run_app(collection: str | None, page: str | None = None, **session) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    if collection is not None:
        at.session_state["collections"] = [collection]
    for k, v in session.items():
        at.session_state[k] = v
    at.run()
    if page:
        at.switch_page(page).run()
    return at


def grids(at: AppTest) -> list:
    """The result grids on the page (`webui.grid`: v2 components), in page order."""
    return list(at.get("bidi_component"))


def cards(at: AppTest) -> list[dict]:
    """Every grid's cards, in page and grid order (thumbnail, caption, line, weak flag, row)."""
    return [c for g in grids(at) for c in json.loads(g.proto.json).get("items", [])]


def results(at: AppTest) -> list[dict]:
    """The result rows on the page, in grid order (each card carries its row for the lightbox)."""
    return [c["details"] for c in cards(at)]


def messages(at: AppTest) -> str:
    return " | ".join(
        [e.value for e in at.error]
        + [w.value for w in at.warning]
        + [i.value for i in at.info]
        + [s.value for s in at.success]
    )
