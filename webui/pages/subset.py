"""Subset: build a subset spec clause by clause (SQL, LAION filters, a kNN search, a concept, a
map region, dedup, a limit), see the rows left after each clause and a sample of them, save it
as COLLECTION/subsets/NAME.yaml, export it with a progress bar, and get the training command.

Counting is `curation.resolve.resolve` (also `python -m curation.subset COLLECTION NAME
--dry-run`), saving `curation.subset.save_subset`, exporting `curation.export.export` (also
`python -m curation.export`). SQL typed here runs sandboxed (`untrusted=True`) everywhere. The
export folder must lie under the app's data roots (`webui.roots.export_folder`).
"""

from __future__ import annotations

import os
import re
import shlex
from typing import Any

import streamlit as st
import yaml

from collection import schema as S
from curation.clauses import CLAUSES
from curation.concept_probe import saved_concepts
from curation.export_job import run_export
from curation.export_shard import ExportError
from curation.filters import PRESETS
from curation.resolve import Resolution, resolve
from curation.spec import SpecError
from curation.subset import save_subset
from webui import components, draft, state
from webui.draft import LISTS, REGION, add_clause, region_label, remove_clause, spec_of
from webui.roots import OutsideRoots, default_export, export_folder

SAVED = "subset_saved"  # {collection path: (name, the clauses saved, description)}
EXPORTED = "subset_exported"  # {collection path: the last export's manifest summary}
ERROR = "subset_error"  # the last refused clause, shown once
KINDS = [k.name for k in CLAUSES]
FORM_KINDS = [k for k in KINDS if k != "keys"]  # keys come from a grid's "Send to Subset"
#: characters of a clause's label in the counts table
LABEL_CHARS = 80
TRAIN_CONFIG = "hdit_train/configs/demo.yaml"
EXPORT_TO = "Export to"
OVERWRITE = "Overwrite an existing export"
#: the export command's flags and the controls that set them on this page
FLAG_WORDS = {
    "--out": f"'{EXPORT_TO}'",
    "--overwrite": f"'{OVERWRITE}'",
    "--format": "'Format'",
    "--shard-size": "'Shard size'",
    "--image-size": "'Image size'",
    "--resize": "the resize mode",
}
FLAG = re.compile(r"--[a-z][a-z-]*")


def _number(text: str, what: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not a number") from None


def form_value(kind: str, path: str) -> Any:
    """The clause the form's widgets describe (ValueError naming the widget when they cannot)."""
    ss = st.session_state
    if kind == "where":
        sql = ss.get("subset_where", "").strip()
        if not sql:
            raise ValueError("SQL condition: type one, e.g. `width >= 64 AND pwatermark < 0.5`")
        return sql
    if kind == "filters":
        overrides = yaml.safe_load(ss.get("subset_filter_overrides") or "{}") or {}
        if not isinstance(overrides, dict):
            raise ValueError("filter overrides: a YAML mapping such as `{max_punsafe: 0.2}`")
        return {"preset": ss.get("subset_filter_preset", "laion"), **overrides}
    if kind == "knn":
        text = ss.get("subset_knn_text", "").strip()
        if not text:
            raise ValueError(
                "kNN text: type a query (weighted prompts as in search: `a red star:1|blurry:-0.5`)"
            )
        clause: dict[str, Any] = {
            "text": text,
            "modality": ss.get("subset_knn_modality", S.MODALITY_IMAGE),
        }
        if ss.get("subset_knn_mode", "k") == "k":
            clause["k"] = int(ss.get("subset_knn_k", 100))
        else:
            clause["min_similarity"] = float(ss.get("subset_knn_min", 0.25))
        if ss.get("subset_knn_exclude"):
            clause["exclude"] = True
        return clause
    if kind == "concept":
        name = ss.get("subset_concept")
        if not name:
            raise ValueError(
                f"concept: none saved in {path}/concepts yet; make one on the Concepts page"
            )
        score = _number(ss.get("subset_concept_min", ""), "concept min score")
        return {"name": name} if score is None else {"name": name, "min_score": score}
    if kind == "region":
        region = ss.get(REGION)
        if region and ss.get("subset_region_from_map", True):
            return {k: v for k, v in region.items() if v is not None}
        rect = [
            _number(ss.get(f"subset_rect_{c}", ""), f"rectangle {c}")
            for c in ("x0", "y0", "x1", "y1")
        ]
        if any(v is None for v in rect):
            raise ValueError(
                "region: select points on the Explore page's map, "
                "or type all four rectangle corners"
            )
        return {"modality": ss.get("subset_region_modality", S.MODALITY_IMAGE), "rect": rect}
    if kind == "dedup":
        level = ss.get("subset_dedup_level", "copies")
        return (
            {"level": level, "eps": float(ss.get("subset_dedup_eps", 0.05))}
            if level == "semantic"
            else level
        )
    if kind == "limit":
        return int(ss.get("subset_limit", 1000))
    raise ValueError(f"unknown clause kind {kind!r}")


def _add(path: str) -> None:
    kind = st.session_state.get("subset_kind", "where")
    try:
        error = add_clause(path, kind, form_value(kind, path))
    except (ValueError, yaml.YAMLError) as exc:
        error = str(exc).splitlines()[0]
    st.session_state[ERROR] = error


def clause_form(cur: state.Current) -> None:
    """The 'add a clause' form: a kind, its inputs, Add."""
    kind = st.selectbox(
        "Add a clause",
        FORM_KINDS,
        key="subset_kind",
        help="Clauses apply in this list's order, whatever the order they are added in.",
    )
    if kind == "where":
        st.text_input(
            "SQL condition on `samples`",
            key="subset_where",
            placeholder="width >= 64 AND pwatermark < 0.5",
        )
    elif kind == "filters":
        c1, c2 = st.columns([1, 2])
        c1.selectbox("Preset", list(PRESETS), key="subset_filter_preset")
        c2.text_input(
            "Overrides (YAML)", key="subset_filter_overrides", placeholder="{max_punsafe: 0.2}"
        )
    elif kind == "knn":
        st.text_input("Search text", key="subset_knn_text", placeholder="a red star:1|blurry:-0.5")
        c1, c2, c3, c4 = st.columns(4)
        mode = c1.radio("Keep", ["k", "min_similarity"], key="subset_knn_mode", horizontal=True)
        if mode == "k":
            c2.number_input("k", 1, 10_000_000, 100, key="subset_knn_k")
        else:
            c2.number_input("min similarity", -1.0, 1.0, 0.25, step=0.01, key="subset_knn_min")
        c3.radio(
            "Index",
            cur.health.indices or [S.MODALITY_IMAGE],
            key="subset_knn_modality",
            horizontal=True,
        )
        c4.toggle("Exclude the matches", key="subset_knn_exclude")
    elif kind == "concept":
        c1, c2 = st.columns(2)
        c1.selectbox("Concept", saved_concepts(cur.path), key="subset_concept")
        c2.text_input("Min score (empty: its threshold)", key="subset_concept_min")
    elif kind == "region":
        region = st.session_state.get(REGION)
        if region:
            st.toggle(
                f"Use the map selection ({region_label(region)})",
                value=True,
                key="subset_region_from_map",
            )
        st.caption("…or a rectangle on the map (its coordinates):")
        cols = st.columns(5)
        cols[0].radio("Map", [S.MODALITY_IMAGE, S.MODALITY_TEXT], key="subset_region_modality")
        for col, c in zip(cols[1:], ("x0", "y0", "x1", "y1")):
            col.text_input(c, key=f"subset_rect_{c}")
    elif kind == "dedup":
        c1, c2 = st.columns(2)
        level = c1.selectbox("Level", list(S.DEDUP_LEVELS), index=1, key="subset_dedup_level")
        if level == "semantic":
            c2.number_input("eps", 0.001, 0.999, 0.05, step=0.01, key="subset_dedup_eps")
    elif kind == "limit":
        st.number_input(
            "At most this many rows (a seeded random sample)", 1, 10**9, 1000, key="subset_limit"
        )
    st.button("Add", key="subset_add", on_click=_add, args=(cur.path,))
    if st.session_state.get(ERROR):
        st.error(st.session_state.pop(ERROR))


def clause_text(kind: str, value: Any) -> str:
    """A clause as one line of YAML; a lasso's points and long key lists summarised (they are
    in the draft)."""
    if kind == "region" and isinstance(value, dict) and value.get("polygon"):
        value = {**value, "polygon": f"{len(value['polygon'])} points"}
    if kind == "keys" and isinstance(value, list) and len(value) > 3:
        value = [*value[:3], f"... {len(value) - 3} more"]
    text = yaml.safe_dump({kind: value}, default_flow_style=True, sort_keys=False, width=10**6)
    return short(text.strip(), 4 * LABEL_CHARS)


def clause_list(path: str, spec: dict[str, Any], bad: tuple | None = None) -> None:
    """The spec's clauses, in the order they apply, each with a Remove button; the error of the
    clause that stops the spec under it."""
    for kind in KINDS:
        if kind not in spec:
            continue
        values = list(enumerate(spec[kind])) if kind in LISTS else [(None, spec[kind])]
        for i, value in values:
            c1, c2 = st.columns([8, 1], vertical_alignment="center")
            c1.code(clause_text(kind, value), language="yaml", wrap_lines=True)
            if bad is not None and bad[0] == kind and bad[1] == i:
                c1.error(bad[2], icon=":material/error:")
            c2.button(
                "",
                key=f"subset_remove_{kind}_{i}",
                icon=":material/close:",
                help="Remove this clause",
                on_click=remove_clause,
                args=(path, kind, i),
            )


def evaluate(cur: state.Current, spec: dict[str, Any]) -> tuple[dict | None, tuple | None]:
    """The dry run of the spec (None when it does not run) and, then, the first clause that
    stops it: (kind, entry index, error)."""
    with st.spinner("Counting…"):
        try:
            return draft.dry_run(cur.path, spec, st.session_state.get(draft.NAME) or ""), None
        except (SpecError, ValueError, FileNotFoundError) as exc:
            return None, draft.first_error(cur.path, spec) or ("", None, draft.message(exc))


def short(text: str, limit: int = LABEL_CHARS) -> str:
    """A clause's label cut to `limit` characters (a lasso's points would fill the row)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def counts(dry: dict[str, Any] | None, bad: tuple | None) -> None:
    """The dry run on the page: the rows after each clause (the count first, so a long clause
    never pushes it out of view), or the error of the clause that stops it."""
    if dry is None:
        kind, _, error = bad or ("", None, "the spec does not run")
        st.error(f"{kind + ': ' if kind else ''}{error}")
        return
    st.dataframe(
        [{"rows": n, "clause": short(label)} for label, n in dry["steps"]],
        hide_index=True,
        width="stretch",
        column_config={
            "rows": st.column_config.NumberColumn("rows", format="localized", width="small"),
            "clause": st.column_config.TextColumn("clause", width="large"),
        },
    )
    st.caption(f"{dry['count']:,} rows · spec hash {dry['spec_hash']}")


def sample_grid(cur: state.Current, dry: dict[str, Any] | None) -> None:
    """A seeded sample of the rows the spec names."""
    if dry is None:
        return
    if not dry["count"]:
        st.info("No rows left: loosen or remove a clause.")
    elif cur.health.searchable:
        st.subheader("A sample")
        components.result_grid(cur.searcher().records(dry["sample"]), key="subset", columns=5)


def save_form(cur: state.Current, spec: dict[str, Any], bad: tuple | None) -> None:
    """Name, description and Save: a spec that does not dry-run is refused, its error shown at
    the clause that stops it (and here)."""
    c1, c2, c3 = st.columns([1, 2, 1], vertical_alignment="bottom")
    name = c1.text_input(
        "Name",
        key=draft.NAME,
        placeholder="red-circles",
        on_change=draft.persist,
        args=(cur.path,),
    )
    description = c2.text_input(
        "Description", key=draft.DESCRIPTION, on_change=draft.persist, args=(cur.path,)
    )
    if c3.button("Save", key="subset_save", type="primary", disabled=not spec):
        doc = {
            "name": name.strip(),
            **({"description": description} if description else {}),
            **spec,
        }
        try:
            if not doc["name"]:
                raise SpecError("name: give the subset a name (letters, digits, '-', '_', '.')")
            bad = draft.first_error(cur.path, spec)
            if bad is not None:
                where = f"the {bad[0]} clause" if bad[0] else "the spec"
                raise SpecError(f"not saved: {where} does not run: {bad[2]}")
            saved = save_subset(cur.path, doc)
        except SpecError as exc:
            st.error(draft.message(exc))
            return
        st.session_state.setdefault(SAVED, {})[cur.path] = (doc["name"], dict(spec), description)
        st.success(f"Saved {saved}")
    saved = st.session_state.get(SAVED, {}).get(cur.path)
    if saved:
        st.code(
            f"python -m curation.subset {shlex.quote(cur.path)} {saved[0]} --dry-run --untrusted",
            language="bash",
            wrap_lines=True,
        )


def export_form(cur: state.Current, spec: dict[str, Any]) -> None:
    """Export the saved subset: folder, format, image size; a progress bar; the training command."""
    saved = st.session_state.get(SAVED, {}).get(cur.path)
    if not saved:
        st.caption("Save the subset to export it.")
        return
    name = saved[0]
    if saved[1] != spec:
        st.warning(
            f"The clauses changed since {name} was saved: the export is of the saved {name}. "
            "Save again to export these."
        )
    default = default_export(cur.path, name, state.data_roots())
    c1, c2, c3, c4 = st.columns([3, 1, 1, 1], vertical_alignment="bottom")
    out = c1.text_input(EXPORT_TO, value=default, key=f"subset_out_{name}").strip()
    fmt = c2.selectbox("Format", list(S.EXPORT_FORMATS), key="subset_format")
    size = c3.number_input("Image size (0: as stored)", 0, 4096, 0, key="subset_image_size")
    shard_size = c4.number_input("Shard size", 1, 1_000_000, 10_000, key="subset_shard_size")
    overwrite = st.toggle(
        OVERWRITE,
        key="subset_overwrite",
        help="Replace what the folder holds when it is an export of another spec "
        "(or not a Sieve export at all). Off: such a folder is refused.",
    )
    if st.button(f"Export {name}", key="subset_export"):
        try:
            out = export_folder(out, state.data_roots())
        except OutsideRoots as exc:  # the same words whether or not the folder exists
            st.error(str(exc))
            return
        bar = st.progress(0.0, text="Resolving…")

        def report(p: dict[str, int]) -> None:
            bar.progress(
                p["shards_done"] / max(p["shards"], 1),
                text=f"{p['shards_done']}/{p['shards']} shards · {p['samples']:,} samples written",
            )

        try:
            manifest = run_export(
                cur.path,
                name,
                out,
                shard_size=int(shard_size),
                image_size=int(size) or None,
                format=fmt,
                overwrite=overwrite,
                client=state.export_client(),
                resolution=saved_resolution(cur, name, saved[1], saved[2]),
                untrusted=True,
                on_progress=report,
            )
        except (SpecError, ExportError, ValueError) as exc:
            bar.empty()
            st.error(page_words(draft.message(exc)))
            return
        bar.progress(1.0, text="Done")
        st.session_state.setdefault(EXPORTED, {})[cur.path] = {
            "out": out,
            "name": name,
            "format": fmt,
            "count": manifest[S.MANIFEST_COUNT],
            "shards": manifest[S.MANIFEST_SHARDS],
            "spec_hash": manifest[S.MANIFEST_SPEC_HASH],
            "command": export_command(
                cur.path, name, out, fmt, int(shard_size), int(size), overwrite
            ),
        }
    done = st.session_state.get(EXPORTED, {}).get(cur.path)
    if done:
        st.success(
            f"Exported {done['count']:,} samples in {done['shards']} shard(s) to {done['out']} "
            f"(spec hash {done['spec_hash']})"
        )
        st.code(done["command"], language="bash", wrap_lines=True)
        if done["format"] == S.EXPORT_WEBDATASET:
            st.caption("Train an HDiT on it:")
            st.code(train_command(done["out"], done["name"]), language="bash", wrap_lines=True)


def saved_resolution(
    cur: state.Current, name: str, clauses: dict[str, Any], description: str = ""
) -> Resolution:
    """The saved spec's rows for the export, resumed from the page's dry runs (the same clauses)
    and with CLIP and concept scores from the app's encoder process (`draft.models`):
    `curation.export.export` takes neither, so it would load torch into the app."""
    doc = {"name": name, **({"description": description} if description else {}), **clauses}
    return resolve(
        cur.path,
        doc,
        untrusted=True,
        cache=draft.CACHE,
        version=draft.version(cur.path),
        **draft.models(cur.path, clauses),
    )


def export_command(
    path: str, name: str, out: str, fmt: str, shard_size: int, size: int, overwrite: bool
) -> str:
    """The command that makes the same export: every setting of the form, spelled out."""
    args = [
        "python -m curation.export",
        shlex.quote(path),
        shlex.quote(name),
        f"--out {shlex.quote(out)}",
        f"--format {fmt}",
        f"--shard-size {int(shard_size)}",
        *([f"--image-size {int(size)}"] if size else []),
        *(["--overwrite"] if overwrite else []),
        "--untrusted",
    ]
    return " ".join(args)


def page_words(text: str) -> str:
    """An export error in this page's words: each command-line flag named by the control that
    sets it here (the page has no other settings, so no other flag can be the fix)."""
    return FLAG.sub(lambda m: FLAG_WORDS.get(m.group(0), "a setting of the command"), text)


def train_command(out: str, name: str) -> str:
    """The exact training command for an export folder."""
    return (
        f"python -m hdit_train.train --data {shlex.quote(out)} --config {TRAIN_CONFIG} "
        f"--out {shlex.quote(os.path.join('runs', name))}"
    )


def inbox(path: str) -> None:
    """Samples a result grid sent here ("Send to Subset"): offered as a keys clause."""
    sent = st.session_state.get(state.SUBSET_INBOX)
    if not sent or sent.get("path") != path or not sent.get("keys"):
        return
    c1, c2, c3 = st.columns([6, 2, 1], vertical_alignment="center")
    c1.info(f"{len(sent['keys'])} samples sent from {sent.get('source') or 'a grid'}.")
    if c2.button("Add as a keys clause", key="subset_inbox_add"):
        error = add_clause(path, "keys", list(sent["keys"]))
        if error is None:
            st.session_state.pop(state.SUBSET_INBOX, None)
        else:
            st.session_state[ERROR] = error
        st.rerun()
    if c3.button("Dismiss", key="subset_inbox_drop"):
        st.session_state.pop(state.SUBSET_INBOX, None)
        st.rerun()


def render() -> None:
    st.title("Subset")
    cur = components.collection_sidebar()
    if not cur.health.queryable:
        state.show_problems(cur.health)
        return
    inbox(cur.path)
    spec = spec_of(cur.path)
    left, right = st.columns([3, 2])
    with left:
        clause_form(cur)
    spec = spec_of(cur.path)  # after the form: its Add may have changed it
    dry, bad = evaluate(cur, spec)
    with left:
        st.subheader("Clauses")
        if spec:
            clause_list(cur.path, spec, bad)
        else:
            st.caption("No clauses yet: the subset is every embedded row the takedown list allows.")
        if st.session_state.get("subset_draft_error"):
            st.warning(st.session_state.pop("subset_draft_error"))
    with right:
        st.subheader("Rows after each clause")
        counts(dry, bad)
    sample_grid(cur, dry)
    st.divider()
    st.subheader("Save")
    save_form(cur, spec, bad)
    st.subheader("Export")
    export_form(cur, spec)


render()
