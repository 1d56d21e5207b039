"""The label set being built on the Concepts page, shared by every grid of the session: kept in
session state per collection and concept name, and written to the collection on every change
(`curation.labels`: concepts/NAME.labels.json), so a reload or another browser loses nothing.

Labels arrive from the grid as {key: [1 | 0 | None, t]} (t: when it was given, in the
browser); a label older than the one already applied for that key is ignored, so two grids
showing the same sample cannot undo each other's newer label.
"""

from __future__ import annotations

import logging
from typing import Any

import streamlit as st

from curation.labels import NEGATIVE, POSITIVE, load_labels, save_labels

log = logging.getLogger(__name__)

LABELS = "concept_labels"  # {collection path: {key: 1 | 0}}: the set of the concept named now
NAMES = "concept_labels_name"  # {collection path: the concept name LABELS holds the set of}
TIMES = "concept_labels_t"  # {collection path: {key: t of the label applied}}
VERSION = "concept_labels_version"  # {collection path: n}: bumped when the set is replaced
NAME = "concept_name"  # the Concepts page's name box
DEFAULT_NAME = "my-concept"
ERROR = "concept_labels_error"

__all__ = ["POSITIVE", "NEGATIVE", "labels_of", "merge", "apply", "replace", "name_of", "version"]


def name_of(path: str) -> str:
    """The concept being labelled: the Concepts page's name box (a default before it is typed)."""
    return (st.session_state.get(NAME) or DEFAULT_NAME).strip() or DEFAULT_NAME


def _load(path: str, name: str) -> dict[str, int]:
    try:
        return load_labels(path, name)
    except (ValueError, OSError) as exc:  # a bad name or a damaged file: said, nothing lost
        st.session_state[ERROR] = str(exc)
        return {}


def labels_of(path: str) -> dict[str, int]:
    """{key: 1 | 0} of the concept named now: read from the collection when this session has
    not seen that name yet. A new name with no saved set takes over the labels given so far."""
    name = name_of(path)
    sets = st.session_state.setdefault(LABELS, {})
    names = st.session_state.setdefault(NAMES, {})
    if names.get(path) != name:
        saved = _load(path, name)
        carried = sets.get(path) or {}
        if not saved and carried and path in names:  # renamed: the labels go with the name
            saved = dict(carried)
            _save(path, name, saved)
        sets[path] = saved
        names[path] = name
        st.session_state.setdefault(TIMES, {})[path] = {}
        _bump(path)
    return sets[path]


def version(path: str) -> int:
    """Changes whenever the set is replaced wholesale (cleared, loaded, renamed): the grids
    then forget the labels they were showing and take the set anew."""
    return st.session_state.setdefault(VERSION, {}).get(path, 0)


def _bump(path: str) -> None:
    versions = st.session_state.setdefault(VERSION, {})
    versions[path] = versions.get(path, 0) + 1


def _save(path: str, name: str, labels: dict[str, int]) -> None:
    try:
        save_labels(path, name, labels)
        st.session_state.pop(ERROR, None)
    except (ValueError, OSError) as exc:  # a bad name, a read-only collection: kept in session
        st.session_state[ERROR] = f"labels kept in this session only: {exc}"


def merge(labels: dict[str, int], times: dict[str, float], given: dict[str, Any]) -> bool:
    """Apply a grid's labels ({key: [1 | 0 | None, t]}; None takes a label back; t None: always
    applied) to `labels` in place, skipping any not newer than the one applied for that key
    (`times`, updated); returns whether `labels` changed. Malformed entries are ignored."""
    changed = False
    for key, entry in given.items():
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            continue
        value, t = entry
        if t is not None:
            if not isinstance(t, (int, float)) or t <= times.get(key, float("-inf")):
                continue
            times[key] = t
        if value in (POSITIVE, NEGATIVE) and labels.get(key) != value:
            labels[key] = int(value)
            changed = True
        elif value is None and key in labels:
            del labels[key]
            changed = True
    return changed


def apply(path: str, given: dict[str, Any]) -> bool:
    """Apply labels from a grid (`merge`) to the set of the concept named now and save it;
    returns whether anything changed."""
    labels = labels_of(path)
    times = st.session_state.setdefault(TIMES, {}).setdefault(path, {})
    changed = merge(labels, times, given)
    if changed:
        _save(path, name_of(path), labels)
    return changed


def replace(path: str, labels: dict[str, int]) -> None:
    """Replace the set wholesale (Clear, Load a saved concept's labels) and save it."""
    labels_of(path)
    st.session_state[LABELS][path] = dict(labels)
    st.session_state[TIMES][path] = {}
    _bump(path)
    _save(path, name_of(path), labels)


def error() -> str | None:
    """Why the labels could not be read or written, if they could not (shown once)."""
    return st.session_state.pop(ERROR, None)
