"""The subset spec a session is building, per collection: the Subset page edits it and the
Explore page's map adds its region to it. Clauses are kept as they are written in YAML, and
each is checked by `curation.resolve.parse_spec` (what resolving will do) before it is kept.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from curation.resolve import parse_spec
from curation.spec import SpecError

SPEC = "subset_spec"  # {collection path: the spec's clauses, as in the YAML}
#: clause kinds holding a list of entries (the others hold one value, replaced when added again)
LISTS = ("where", "knn", "concept")
#: the map selection {modality, rect | polygon} the Explore page made, offered as a region clause
REGION = "explore_region"


def spec_of(path: str) -> dict[str, Any]:
    """This session's spec clauses for a collection (created empty)."""
    return st.session_state.setdefault(SPEC, {}).setdefault(path, {})


def add_clause(path: str, kind: str, value: Any) -> str | None:
    """Add one clause to the collection's spec after checking it; the error (one line) when it
    is refused, the spec then unchanged."""
    spec = dict(spec_of(path))
    spec[kind] = [*spec.get(kind, []), value] if kind in LISTS else value
    try:
        parse_spec(spec, path)
    except SpecError as exc:
        return str(exc).replace("<spec>: ", "")
    st.session_state[SPEC][path] = spec
    return None


def remove_clause(path: str, kind: str, index: int | None) -> None:
    """Remove a clause (one entry of a list kind, or the kind's value)."""
    spec = spec_of(path)
    if index is None or kind not in LISTS:
        spec.pop(kind, None)
    else:
        spec[kind] = [v for i, v in enumerate(spec[kind]) if i != index]
        if not spec[kind]:
            spec.pop(kind)


def region_label(region: dict[str, Any]) -> str:
    """'rectangle on the image map' / 'lasso of 12 points on the image map'."""
    shape = (
        "rectangle"
        if region.get("rect") is not None
        else f"lasso of {len(region.get('polygon') or [])} points"
    )
    return f"{shape} on the {region.get('modality', 'image')} map"
