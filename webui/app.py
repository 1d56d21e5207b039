"""`streamlit run webui/app.py [-- --collection PATH ...]`: explore a collection, label concepts,
build a subset, send it to training.

The entry page: reads the command line, keeps the list of open collections in the session,
draws the sidebar (pick a collection, open another, what it has been built up to) and the
navigation between the pages in `webui/pages/`. With no --collection it opens what `make
demo` builds. Everything the pages do is a Python function and a command too; the app holds
presentation and session state only.
"""

from __future__ import annotations

import argparse
import os
import sys

import streamlit as st

from webui import state

PAGES = (
    ("pages/search.py", "Search", ":material/search:"),
    ("pages/explore.py", "Explore", ":material/monitoring:"),
    ("pages/sql.py", "SQL", ":material/database:"),
    ("pages/concepts.py", "Concepts", ":material/thumbs_up_down:"),
    ("pages/subset.py", "Subset", ":material/filter_alt:"),
)


def parse_args(argv: list[str]) -> list[str]:
    """The collections named on the command line (after streamlit's `--`)."""
    p = argparse.ArgumentParser(prog="streamlit run webui/app.py --", exit_on_error=False)
    p.add_argument("--collection", action="append", default=[], help="a collection folder (repeatable)")
    return p.parse_args(argv).collection


def _open_another() -> None:
    path = os.path.abspath(os.path.expanduser(st.session_state.get("open_path", "").strip()))
    if not st.session_state.get("open_path", "").strip():
        return
    if not os.path.isdir(path):
        st.session_state["open_error"] = f"{path}: no such folder"
        return
    st.session_state.pop("open_error", None)
    if path not in st.session_state[state.COLLECTIONS]:
        st.session_state[state.COLLECTIONS].append(path)
    st.session_state[state.CURRENT] = path
    st.session_state["open_path"] = ""


def sidebar() -> None:
    """Collection picker, 'open another', and what the chosen one holds."""
    paths = st.session_state[state.COLLECTIONS]
    if st.session_state.get(state.CURRENT) not in paths:
        st.session_state[state.CURRENT] = paths[0]
    with st.sidebar:
        st.selectbox("Collection", paths, key=state.CURRENT, format_func=_label)
        st.text_input("Open another collection", key="open_path", placeholder="/path/to/collection",
                      on_change=_open_another)
        if st.session_state.get("open_error"):
            st.error(st.session_state["open_error"])
        health = state.inspect(st.session_state[state.CURRENT])
        if health.exists and health.parts:
            st.caption(f"{health.parts} part(s) · indices: {', '.join(health.indices) or 'none'}")


def _label(path: str) -> str:
    parent, name = os.path.split(path.rstrip("/"))
    return f"{os.path.basename(parent)}/{name}" if parent else name


def main() -> None:
    st.set_page_config(page_title="Sieve", page_icon=":material/filter_alt:", layout="wide")
    if state.COLLECTIONS not in st.session_state:
        try:
            paths = parse_args(sys.argv[1:])
        except (argparse.ArgumentError, SystemExit) as exc:
            st.error(f"command line: {exc}; expected `streamlit run webui/app.py -- --collection PATH ...`")
            paths = []
        state.open_collections(paths)
    sidebar()
    pages = [st.Page(path, title=title, icon=icon) for path, title, icon in PAGES]
    st.navigation(pages).run()


main()
