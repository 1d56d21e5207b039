"""The subset spec a session is building, per collection: the Subset page edits it, and the
Explore page's map and histograms add clauses to it.

A clause is kept only once the spec with it parses (`curation.resolve.parse_spec`) and dry-runs
(`curation.resolve.resolve`, sandboxed, as `python -m curation.subset COLLECTION SPEC --dry-run
--untrusted` does): a clause that does not run is refused with its error where it was added.
The dry run is incremental (a process-wide `StepCache`): an added clause narrows the rows of the
clauses before it instead of re-running the spec. The draft (clauses, name, description) is
written to COLLECTION/subsets/drafts/draft.json on every change (atomically), and a new session
starts from it, so a reload loses nothing.
"""

from __future__ import annotations

import logging
import posixpath
import threading
from typing import Any

import numpy as np
import streamlit as st

from collection import schema as S
from collection.storage import REMOTE_ERRORS, read_json, write_json
from curation.catalog import Catalog, SqlError
from curation.clauses import CLAUSES
from curation.context import sandbox_catalog
from curation.resolve import StepCache, parse_spec, resolve
from curation.spec import SpecError
from webui import state

log = logging.getLogger(__name__)

SPEC = "subset_spec"  # {collection path: the spec's clauses, as in the YAML}
#: clause kinds holding a list of entries (the others hold one value, replaced when added again)
LISTS = ("where", "knn", "concept")
#: the map selection {modality, rect | polygon} the Explore page made, offered as a region clause
REGION = "explore_region"
#: the session-state keys of the Subset page's name and description, kept in the draft too
NAME, DESCRIPTION = "subset_name", "subset_description"
#: the draft's file under the collection's subsets/ folder
DRAFT = posixpath.join("drafts", "draft.json")
#: ids of a dry run shown as a sample
SAMPLE = 10
#: the rows after each resolved prefix of clauses, shared by every session of the process
CACHE = StepCache()


def draft_path(path: str) -> str:
    """COLLECTION/subsets/drafts/draft.json."""
    return posixpath.join(S.CollectionLayout(path).subsets_dir, DRAFT)


def _restore(path: str) -> dict[str, Any]:
    """The clauses of the collection's saved draft (name and description into the session)."""
    try:
        doc = read_json(draft_path(path), missing=None)
    except (ValueError, *REMOTE_ERRORS) as exc:  # unreadable: start empty, say why in the log
        log.warning("%s: draft not read: %s", draft_path(path), exc)
        return {}
    if not isinstance(doc, dict) or not isinstance(doc.get("clauses"), dict):
        return {}
    for key, field in ((NAME, "name"), (DESCRIPTION, "description")):
        if doc.get(field) and key not in st.session_state:
            st.session_state[key] = str(doc[field])
    known = {k.name for k in CLAUSES}
    return {k: v for k, v in doc["clauses"].items() if k in known}


def spec_of(path: str) -> dict[str, Any]:
    """This session's spec clauses for a collection (from its saved draft at session start)."""
    specs = st.session_state.setdefault(SPEC, {})
    if path not in specs:
        specs[path] = _restore(path)
    return specs[path]


def persist(path: str) -> str | None:
    """Write the session's draft into the collection; the error (one line) when it cannot be."""
    doc = {
        "name": st.session_state.get(NAME) or "",
        "description": st.session_state.get(DESCRIPTION) or "",
        "clauses": spec_of(path),
    }
    try:
        write_json(draft_path(path), doc)
    except (OSError, *REMOTE_ERRORS) as exc:  # a read-only collection: the session keeps it
        return f"{draft_path(path)}: the draft is not saved ({type(exc).__name__}: {exc})"
    return None


def version(path: str) -> tuple:
    """What a dry run's rows depend on besides the spec: the collection's parts and indices,
    its concepts, map, duplicates and takedown list."""
    return (state.inspect(path).signature, state.insight_version(path))


@st.cache_resource(max_entries=8, show_spinner=False)
def _sandbox(path: str, signature: tuple) -> Catalog:
    """The sandboxed catalog every dry run of a collection's version shares: its workers stay
    started between clauses (a start costs a second or more, and grows with the parts). One
    worker, started in the background as the page opens, before the first clause is added."""
    catalog = sandbox_catalog(path, workers=1)
    threading.Thread(target=_start, args=(catalog,), name="subset-sandbox", daemon=True).start()
    return catalog


def _start(catalog: Catalog) -> None:
    try:
        catalog.start()
    except SqlError as exc:  # the first clause's query says it again, on the page
        log.warning("%s: the SQL sandbox did not start: %s", catalog.root, exc)


def models(path: str, spec: dict[str, Any]) -> dict[str, Any]:
    """`resolve`'s encoder and concept scorer for `spec`: the app's encoder process (shared
    with search), asked only by the clauses that need it (kNN; a concept without current saved
    scores), so the app's own process never loads torch."""
    if not (spec.get("knn") or spec.get("concept")):
        return {}
    client = state.collection_encoder(path)
    return {"encoder": client if spec.get("knn") else None, "scorer": client.concept_passing}


def dry_run(path: str, spec: dict[str, Any], name: str = "subset") -> dict[str, Any]:
    """The spec resolved as the CLI's dry run does (sandboxed SQL), incrementally: rows after
    each clause, the count, the spec hash and a seeded sample of ids. SpecError or ValueError
    (one line) when it does not run."""
    doc = {"name": name or "subset", **spec}
    res = resolve(
        path,
        doc,
        untrusted=True,
        cache=CACHE,
        version=version(path),
        keys=False,
        sandbox=_sandbox(path, state.inspect(path).signature),
        **models(path, spec),
    )
    rng = np.random.default_rng(0)
    n = len(res.ids)
    sample = np.sort(rng.choice(res.ids, size=min(SAMPLE, n), replace=False)) if n else res.ids
    return {
        "steps": [(s.label, s.count) for s in res.steps],
        "count": n,
        "spec_hash": res.spec_hash,
        "sample": [int(i) for i in sample],
    }


def message(exc: BaseException) -> str:
    """An error as the page shows it: one line, without the spec's placeholder name."""
    text = str(exc).replace("<spec>: ", "").strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check(path: str, spec: dict[str, Any]) -> str | None:
    """Whether `spec` parses and dry-runs: None, or its error (one line)."""
    try:
        parse_spec(spec, path)
        dry_run(path, spec)
    except (SpecError, ValueError, FileNotFoundError) as exc:
        return message(exc)
    return None


def first_error(path: str, spec: dict[str, Any]) -> tuple[str, int | None, str] | None:
    """(kind, entry index or None, error) of the first clause, in the order clauses apply,
    with which the spec stops running; None when it runs. Each prefix resumes from the cache."""
    if check(path, spec) is None:
        return None
    prefix: dict[str, Any] = {}
    for kind in (k.name for k in CLAUSES):
        if kind not in spec:
            continue
        entries = list(enumerate(spec[kind])) if kind in LISTS else [(None, spec[kind])]
        for i, value in entries:
            prefix[kind] = [*prefix.get(kind, []), value] if kind in LISTS else value
            error = check(path, prefix)
            if error is not None:
                return kind, i, error
    return "", None, check(path, spec) or "the spec does not run"


def add_clause(path: str, kind: str, value: Any) -> str | None:
    """Add one clause to the collection's spec after checking it (parsed and dry-run); the error
    (one line) when it is refused, the spec then unchanged."""
    spec = dict(spec_of(path))
    spec[kind] = [*spec.get(kind, []), value] if kind in LISTS else value
    error = check(path, spec)
    if error is not None:
        return error
    st.session_state[SPEC][path] = spec
    st.session_state["subset_draft_error"] = persist(path)
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
    st.session_state["subset_draft_error"] = persist(path)


def region_label(region: dict[str, Any]) -> str:
    """'rectangle on the image map' / 'lasso of 12 points on the image map'."""
    shape = (
        "rectangle"
        if region.get("rect") is not None
        else f"lasso of {len(region.get('polygon') or [])} points"
    )
    return f"{shape} on the {region.get('modality', 'image')} map"
