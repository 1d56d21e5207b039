"""Helpers the web UI's AppTest files share: run the app (on a page, with session state), read
the result cards and the messages on the page."""

from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

from bench.apptest import cards, grids, results  # noqa: F401 - the tests' names for them

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


def messages(at: AppTest) -> str:
    return " | ".join(
        [e.value for e in at.error]
        + [w.value for w in at.warning]
        + [i.value for i in at.info]
        + [s.value for s in at.success]
    )
