"""`streamlit run webui/app.py [-- --collection PATH ... --data-root FOLDER ...]`: explore a
collection, label concepts, build a subset, send it to training.

The entry page: reads the command line, keeps the list of open collections in the session and
runs the navigation between the pages in `webui/pages/` (each draws the collection picker in
the sidebar: `webui.components.collection_sidebar`). With no --collection it opens what
`make demo` builds. The app reads and writes files only under its data roots (`--data-root`,
default the collections it opened; `webui.roots`). Everything the pages do is a Python function
and a command too; the app holds presentation and session state only.
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


def parse_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(collections, data roots) named on the command line (after streamlit's `--`)."""
    p = argparse.ArgumentParser(prog="streamlit run webui/app.py --", exit_on_error=False)
    p.add_argument(
        "--collection", action="append", default=[], help="a collection folder (repeatable)"
    )
    p.add_argument(
        "--data-root",
        action="append",
        default=[],
        help="a folder the app may read and write under (repeatable; default: the collections)",
    )
    a = p.parse_args(argv)
    return a.collection, a.data_root


def main() -> None:
    st.set_page_config(page_title="Sieve", page_icon=":material/filter_alt:", layout="wide")
    if state.COLLECTIONS not in st.session_state:
        try:
            paths, roots = parse_args(sys.argv[1:])
        except (argparse.ArgumentError, SystemExit) as exc:
            st.error(
                f"command line: {exc}; expected "
                "`streamlit run webui/app.py -- --collection PATH ... --data-root FOLDER ...`"
            )
            paths, roots = [], []
        state.open_collections(paths, roots)
    pages = [st.Page(path, title=title, icon=icon) for path, title, icon in PAGES]
    st.navigation(pages).run()


main()
