"""Concepts: find examples by search, mark them 👍/👎, train the probe, see its quality grade and
threshold and the collection ranked by it, label the samples it suggests (those it is least
sure of), and save the concept for the Subset page's concept clause.

Training is `curation.concept_probe.fit_concept` (labels, the prompt and a bounded sample of
unlabelled rows); the grade and threshold show at once (the examples' search is not run
again), and once they are drawn the encoder process scores the whole collection in the
background, at a lower priority (`ranking`: the count above the threshold, the top and the
suggestions, by id), keeping the scores for Save (`save_concept`): the app holds no per-row
array. The same as `python -m curation.concept COLLECTION NAME --pos ... --neg ...`.
"""

from __future__ import annotations

import shlex
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx

from collection import schema as S
from curation.concept_probe import MODALITIES, fit_concept, load_concept, saved_concepts
from webui import components, grid, labelling, searches, state

FIT = "concept_fit"  # {collection path: {"concept": Concept, "ranking": Future | None}}
NOTE = "concept_note"
UP, DOWN = ":material/thumb_up:", ":material/thumb_down:"
SHOWN = 10
#: seconds between the page's looks at a ranking still being scored
POLL_S = 1.0
#: the background scoring passes (in the encoder process; these threads only wait on them)
_RANKING = ThreadPoolExecutor(max_workers=2, thread_name_prefix="concept-ranking")


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
            if train(cur) and _fragment_run():
                st.rerun(scope="app")  # the fit shows below this panel, outside the fragment
        if b3.button("Clear labels", key="concept_clear"):
            _clear(cur.path)
            st.rerun()  # every grid on the page shows the cleared set
        note = st.session_state.pop(NOTE, None)
        if note:
            (st.error if note[0] == "error" else st.info)(note[1])
    if rows:
        grid.show(rows, key=key, path=cur.path, mode="label", source=f"concept {key}")
        grid.notice()


def _rows(cur: state.Current, ranked: list[tuple[int, float]]) -> list[dict[str, Any]]:
    """Grid rows of (id, score) pairs, in their order."""
    score = dict(ranked)
    rows = cur.searcher().records([i for i, _ in ranked])
    for r in rows:
        r["score"] = score[r["id"]]
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
    try:  # cached: Train and the labels rerun the page without searching again
        rows = searches.search(
            cur.path,
            searches.version(cur),
            "text",
            text.strip(),
            int(k),
            S.MODALITY_IMAGE,
            "",
            False,
            False,
            False,
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
    clip = state.collection_encoder(cur.path)
    try:
        with st.spinner("Training the probe…"):
            concept = fit_concept(cur.path, name, pos, neg, prompt or None, modality, clip=clip)
    except (
        ValueError,
        FileNotFoundError,
    ) as exc:  # too few labels, a bad name, a collection that cannot
        st.session_state[NOTE] = ("error", str(exc))
        return False
    # the collection's ranking is asked for once the fit is on the page (`_wait`)
    st.session_state.setdefault(FIT, {})[cur.path] = {"concept": concept, "ranking": None}
    return True


def _fragment_run() -> bool:
    """Whether this run is a fragment's alone (a click in a panel), not the page's."""
    ctx = get_script_run_ctx()
    return bool(ctx is not None and ctx.fragment_ids_this_run)


def _ranked(job: Future) -> dict[str, Any] | None:
    """The finished ranking (None while scoring); its error shown on the page."""
    if not job.done():
        return None
    try:
        return job.result()
    except (ValueError, OSError) as exc:
        st.error(f"scoring the collection: {exc}")
        return {"rows": 0, "above": 0, "top": [], "near": []}


@st.fragment(run_every=POLL_S)
def _wait(job: Future) -> None:
    """While the collection is being scored: a note, and the page again once it is done."""
    if job.done():
        st.rerun(scope="app")
    st.info("Scoring the collection with the concept… the ranking shows when it is done.")


def _ranking(cur: state.Current, fit: dict[str, Any]) -> Future:
    """The collection's ranking by the fitted concept: scored in the encoder process, in the
    background, asked for the first time the fit is drawn (after it, so the pass does not
    compete with drawing it)."""
    if fit["ranking"] is None:
        clip = state.collection_encoder(cur.path)
        fit["ranking"] = _RANKING.submit(clip.ranking, cur.path, fit["concept"], SHOWN * 2, SHOWN)
    return fit["ranking"]


def show_fit(cur: state.Current, fit: dict[str, Any]) -> None:
    """Quality, threshold, the top of the ranking, the samples to label next, Save."""
    concept, job = fit["concept"], fit["ranking"]
    ranked = None if job is None else _ranked(job)
    q = concept.quality
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("Quality", q.get("grade", "unknown"))
    m2.metric("CV AUROC", f"{q['cv_auroc']:.3f}" if "cv_auroc" in q else "n/a")
    m3.metric("Threshold", f"{concept.threshold:.3f}")
    if ranked is not None:
        m4.metric("Above threshold", f"{ranked['above']:,} of {ranked['rows']:,}")
    elif q.get("passed_fraction") is not None:
        m4.metric("Above threshold", f"~{q['passed_fraction']:.1%}", help="of a random sample")
    if q.get("reason"):
        st.caption(q["reason"])
    c1, c2 = st.columns([1, 3], vertical_alignment="bottom")
    if c1.button(f"Save {concept.name}", key="concept_save", type="primary"):
        try:
            with st.spinner("Saving the concept and its scores…"):
                path = state.collection_encoder(cur.path).save_concept(cur.path, concept)
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
    if ranked is None:
        _wait(_ranking(cur, fit))
        return
    top, nxt = st.tabs(["Ranked by the concept", "Label next (least certain)"])
    with top:
        label_panel(cur, _rows(cur, ranked["top"]), "concept-top")
    with nxt:
        st.caption("Label these and train again: each answer teaches the probe where it is unsure.")
        label_panel(cur, _rows(cur, ranked["near"]), "concept-next")


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
        show_fit(cur, fit)


render()
