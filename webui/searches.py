"""The searches the pages run (Search, and Concepts' examples to label), cached per process on
everything that decides their answer: a page's rerun (a label, a toggle, Train) reads the
index again only when the query, the collection or its takedown list changed."""

from __future__ import annotations

from typing import Any

import streamlit as st

from indices.query import query
from webui import state


@st.cache_data(max_entries=64, show_spinner=False)
def search(
    path: str,
    version: tuple,
    kind: str,
    value: Any,
    k: int,
    modality: str,
    filters: str,
    safe: bool,
    dedup: bool,
    hide_wm: bool,
) -> list[dict[str, Any]]:
    """One search (`indices.query.query`); `version` is (the collection's signature, the
    searcher's takedown version), so a rebuilt index or a takedown is searched anew."""
    searcher = state.loaded(path, version[0]).searcher()
    args: dict[str, Any] = {"text": None, "image": None, "like": None, kind: value}
    return query(
        path,
        k=k,
        modality=modality,
        filters=filters or None,
        safe_mode=safe,
        hide_watermarked=hide_wm,
        deduplicate=dedup,
        searcher=searcher,
        **args,
    )


def version(cur: state.Current) -> tuple:
    """What a cached search of the current collection is keyed on: its signature and the
    searcher's takedown version (the list read again first)."""
    searcher = cur.searcher()
    searcher.refresh_takedown()
    return (cur.health.signature, searcher.takedown_version)
