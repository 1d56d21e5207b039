"""Concepts: find examples by search, mark them 👍/👎, train the probe, see its quality grade and
threshold and the collection ranked by it, label the samples it suggests (those it is least
sure of), and save the concept for the Subset page's concept clause.

Training is `curation.concept_probe.fit_concept` + `score_collection`, saving `save_concept`, the
suggestions `suggest`: the same as `python -m curation.concept COLLECTION NAME --pos ... --neg ...`.
"""

from __future__ import annotations

import shlex
from typing import Any

import numpy as np
import streamlit as st

from curation.concept_probe import (
    MODALITIES,
    Concept,
    fit_concept,
    load_concept,
    save_concept,
    saved_concepts,
    suggest,
)
from curation.vectors import read_keys
from indices.query import query
from webui import components, grid, labelling, state

FIT = "concept_fit"  # {collection path: {"concept": Concept, "scores": array}}
NOTE = "concept_note"
UP, DOWN = ":material/thumb_up:", ":material/thumb_down:"
SHOWN = 10


@st.cache_resource(max_entries=8, show_spinner=False)
def _keys(path: str, signature: tuple) -> np.ndarray:
    """Every embedded row's key, in global-id order (a key's id is its position); shared, not
    copied per rerun (a million keys)."""
    return read_keys(path)


def _clear(path: str) -> None:
    labelling.replace(path, {})
    st.session_state.get(FIT, {}).pop(path, None)


def _load(path: str) -> None:
    name = st.session_state.get("concept_saved")
    try:
        concept = load_concept(path, name)
    except (ValueError, FileNotFoundError) as exc:
        st.session_state[NOTE] = ("error", str(exc))
        return
    st.session_state[labelling.NAME] = concept.name
    st.session_state["concept_prompt"] = concept.prompt or ""
    labelling.replace(
        path, {**{k: 0 for k in concept.negatives}, **{k: 1 for k in concept.positives}}
    )
    st.session_state.get(FIT, {}).pop(path, None)
    st.session_state[NOTE] = (
        "info",
        f"Loaded {name}: {len(concept.positives)} {UP}, {len(concept.negatives)} {DOWN}",
    )


@st.fragment
def label_panel(
    cur: state.Current, rows: list[dict[str, Any]], key: str, trainer: bool = False
) -> None:
    """A grid to label with the keys (1 👍, 2 👎, 3 skip) and, for the first, the counts and
    Train beside it. A fragment: a label reruns this panel only, never the page."""
    labels = labelling.labels_of(cur.path)
    if trainer:
        n_pos = sum(v == 1 for v in labels.values())
        b1, b2, b3 = st.columns([3, 1, 1], vertical_alignment="center")
        b1.markdown(
            f"**{n_pos}** {UP} · **{len(labels) - n_pos}** {DOWN} labelled, saved in the "
            f"collection as `concepts/{labelling.name_of(cur.path)}.labels.json`"
        )
        if b2.button("Train", key="concept_train", type="primary", disabled=len(labels) < 2):
            if train(cur):
                st.rerun()  # the whole page: the fit's grade, ranking and suggestions
        if b3.button("Clear labels", key="concept_clear"):
            _clear(cur.path)
            st.rerun()  # every grid on the page shows the cleared set
        note = st.session_state.pop(NOTE, None)
        if note:
            (st.error if note[0] == "error" else st.info)(note[1])
    if rows:
        grid.show(rows, key=key, path=cur.path, mode="label", source=f"concept {key}")
        grid.notice()


def _rows(
    cur: state.Current, ids: list[int], scores: np.ndarray | None = None
) -> list[dict[str, Any]]:
    rows = cur.searcher().records(ids)
    if scores is not None:
        for r in rows:
            r["score"] = float(scores[r["id"]])
    return rows


def find_examples(cur: state.Current) -> list[dict[str, Any]]:
    """Search the collection for samples to label (its results; [] when there are none)."""
    c1, c2 = st.columns([4, 1])
    text = c1.text_input(
        "Find examples",
        key="concept_query",
        placeholder="a red circle  ·  a blue square:1|red:-0.5",
        help="A search (weighted prompts as on the Search page) whose results you label below.",
    )
    k = c2.number_input("Results", 5, 100, 20, key="concept_k")
    if not text.strip():
        st.caption(
            f"Search for samples, then mark each {UP} (shows the concept) or {DOWN} (does not)."
        )
        return []
    try:
        rows = query(
            cur.path,
            text=text.strip(),
            k=int(k),
            safe_mode=False,
            hide_watermarked=False,
            deduplicate=False,
            searcher=cur.searcher(),
        )
    except ValueError as exc:  # QueryError: a malformed prompt
        st.error(str(exc))
        return []
    if not rows:
        st.info("No results for that search.")
        return []
    return rows


def train(cur: state.Current) -> bool:
    """Fit the concept from the labels given so far; False (and a note) when it cannot be."""
    labels = labelling.labels_of(cur.path)
    name = labelling.name_of(cur.path)
    prompt = st.session_state.get("concept_prompt", "").strip()
    modality = st.session_state.get("concept_modality", MODALITIES[0])
    pos = [k for k, v in labels.items() if v == 1]
    neg = [k for k, v in labels.items() if v == 0]
    try:
        with st.spinner("Training the probe and scoring the collection…"):
            concept = fit_concept(
                cur.path,
                name,
                pos,
                neg,
                prompt or None,
                modality,
                clip=state.collection_encoder(cur.path),
            )
            # in the encoder process: the app itself never loads torch or pages every embedding
            scores = state.collection_encoder(cur.path).score_collection(cur.path, concept)
    except (
        ValueError,
        FileNotFoundError,
    ) as exc:  # too few labels, a bad name, a collection that cannot
        st.session_state[NOTE] = ("error", str(exc))
        return False
    st.session_state.setdefault(FIT, {})[cur.path] = {"concept": concept, "scores": scores}
    return True


def show_fit(cur: state.Current, concept: Concept, scores: np.ndarray) -> None:
    """Quality, threshold, the top of the ranking, the samples to label next, Save."""
    keys = _keys(cur.path, cur.health.signature)
    q = concept.quality
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("Quality", q.get("grade", "unknown"))
    m2.metric("CV AUROC", f"{q['cv_auroc']:.3f}" if "cv_auroc" in q else "n/a")
    m3.metric("Threshold", f"{concept.threshold:.3f}")
    m4.metric("Above threshold", f"{int((scores >= concept.threshold).sum()):,} of {len(scores):,}")
    if q.get("reason"):
        st.caption(q["reason"])
    c1, c2 = st.columns([1, 3], vertical_alignment="bottom")
    if c1.button(f"Save {concept.name}", key="concept_save", type="primary"):
        try:
            path = save_concept(cur.path, concept, scores, keys)
        except (OSError, ValueError) as exc:
            st.error(f"cannot save {concept.name}: {exc}")
        else:
            st.success(f"Saved {path}; use it as a `concept` clause on the Subset page.")
    pos = ",".join(concept.positives)
    neg = ",".join(concept.negatives)
    prompt = f" --prompt {shlex.quote(concept.prompt)}" if concept.prompt else ""
    c2.code(
        f"python -m curation.concept {shlex.quote(cur.path)} "
        f"{concept.name} --pos {shlex.quote(pos)} "
        f"--neg {shlex.quote(neg)} --modality {concept.modality}{prompt}",
        language="bash",
        wrap_lines=True,
    )
    top, nxt = st.tabs(["Ranked by the concept", "Label next (least certain)"])
    with top:
        order = np.argsort(-scores, kind="stable")[: SHOWN * 2]
        label_panel(cur, _rows(cur, order.tolist(), scores), "concept-top")
    with nxt:
        wanted = suggest(concept, keys, scores, SHOWN)
        rank = {k: r for r, k in enumerate(wanted)}
        ids = sorted(np.flatnonzero(np.isin(keys, wanted)).tolist(), key=lambda i: rank[keys[i]])
        st.caption("Label these and train again: each answer teaches the probe where it is unsure.")
        label_panel(cur, _rows(cur, ids, scores), "concept-next")


def render() -> None:
    st.title("Concepts")
    cur = components.collection_sidebar()
    if not cur.health.searchable:
        state.show_problems(cur.health, "Concepts need the collection's embeddings and index.")
        return
    c1, c2, c3 = st.columns([1, 2, 1])
    st.session_state.setdefault(labelling.NAME, labelling.DEFAULT_NAME)
    c1.text_input("Concept name", key="concept_name")
    c2.text_input("Prompt (optional prior)", key="concept_prompt", placeholder="a red circle")
    c3.radio("Embeddings", MODALITIES, key="concept_modality", horizontal=True)
    saved = saved_concepts(cur.path)
    if saved:
        s1, s2 = st.columns([3, 1], vertical_alignment="bottom")
        s1.selectbox("Saved concepts", saved, key="concept_saved")
        s2.button("Load its labels", key="concept_load", on_click=_load, args=(cur.path,))
    labelling.labels_of(cur.path)  # the set of this name, read back from the collection
    problem = labelling.error()
    if problem:
        st.error(problem)
    if st.session_state.get(NOTE, ("",))[0] == "info":
        st.info(st.session_state.pop(NOTE)[1])
    label_panel(cur, find_examples(cur), "concept-find", trainer=True)
    fit = st.session_state.get(FIT, {}).get(cur.path)
    if fit:
        st.divider()
        show_fit(cur, fit["concept"], fit["scores"])


render()
