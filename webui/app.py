"""`streamlit run webui/app.py [-- --collection PATH ...]`: explore a collection, label concepts,
build a subset, send it to training.

The entry page: reads the command line, keeps the list of open collections in the session and
runs the navigation between the pages in `webui/pages/` (each draws the collection picker in
the sidebar: `webui.components.collection_sidebar`). With no --collection it opens what
`make demo` builds. Everything the pages do is a Python function and a command too; the app
holds presentation and session state only.
"""

from __future__ import annotations

import argparse
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
    p.add_argument(
        "--collection", action="append", default=[], help="a collection folder (repeatable)"
    )
    return p.parse_args(argv).collection


def main() -> None:
    st.set_page_config(page_title="Sieve", page_icon=":material/filter_alt:", layout="wide")
    if state.COLLECTIONS not in st.session_state:
        try:
            paths = parse_args(sys.argv[1:])
        except (argparse.ArgumentError, SystemExit) as exc:
            st.error(
                f"command line: {exc}; expected `streamlit run webui/app.py -- --collection PATH ...`"
            )
            paths = []
        state.open_collections(paths)
    pages = [st.Page(path, title=title, icon=icon) for path, title, icon in PAGES]
    st.navigation(pages).run()


main()
