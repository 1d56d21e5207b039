"""The web UI's curation pages through AppTest: a concept trained from 👍/👎 clicks and saved,
the Explore map's selection as a region clause, and the Subset page's clauses, counts, saved
YAML and export (with the training command), bad input shown on the page."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from collection import schema as S
from collection.parts import read_metadata
from curation.catalog import Catalog
from curation.concept_probe import load_concept, saved_concepts, score_collection
from curation.labels import load_labels, save_labels
from curation.resolve import resolve
from curation.vectors import read_keys, write_table
from tests.webui_app import grids, messages, results, run_app
from webui import encoder
from webui.roots import roots_of

CONCEPT = "red"


@pytest.fixture(scope="module")
def coll(demo_collection, tmp_path_factory) -> str:
    """A copy of the demo-sized collection (these pages write concepts/, subsets/, exports), with a
    map laid out by hand: x is the sample's colour, y its shape, so a region means something."""
    root = str(tmp_path_factory.mktemp("curate") / "collection")
    shutil.copytree(demo_collection["demo/collection"], root)
    keys = read_keys(root)
    meta = read_metadata(root, [S.KEY, "color", "shape"]).to_pylist()
    by_key = {r[S.KEY]: r for r in meta}
    colours = sorted({r["color"] for r in meta})
    shapes = sorted({r["shape"] for r in meta})
    rng = np.random.default_rng(0)
    x = np.array([colours.index(by_key[k]["color"]) for k in keys]) + rng.uniform(
        -0.2, 0.2, len(keys)
    )
    y = np.array([shapes.index(by_key[k]["shape"]) for k in keys]) + rng.uniform(
        -0.2, 0.2, len(keys)
    )
    write_table(
        S.InsightLayout(root).map(S.MODALITY_IMAGE),
        pa.table(
            {
                S.KEY: pa.array(list(keys)),
                S.MAP_X: pa.array(x, pa.float32()),
                S.MAP_Y: pa.array(y, pa.float32()),
                S.MAP_CLUSTER: pa.array(np.zeros(len(keys), np.int32)),
            }
        ),
    )
    return root


def _red_x(coll: str) -> float:
    colours = sorted({r["color"] for r in read_metadata(coll, ["color"]).to_pylist()})
    return float(colours.index("red"))


def _labelled(coll: str, rows, wanted, name: str = CONCEPT) -> dict[str, int]:
    """Labels given as the grid gives them (AppTest cannot press its keys; the browser test
    does): written to the collection's label set, which the page reads back."""
    labels = {**load_labels(coll, name), **{r["key"]: int(wanted(r)) for r in rows}}
    save_labels(coll, name, labels)
    return labels


def _scored(at):
    """The page once the encoder process has scored the collection in the background (in a
    browser, the waiting fragment reruns the page itself)."""
    for _ in range(600):
        if "Scoring the collection" not in messages(at):
            return at
        time.sleep(0.1)
        at.run()
    raise AssertionError("the collection's ranking never came")


def test_a_concept_trains_from_saved_labels_and_is_saved(coll):
    at = run_app(coll, "pages/concepts.py")
    assert not at.exception and at.button(key="concept_train").disabled
    at.text_input(key="concept_query").input("a red circle").run()
    rows = results(at)
    assert len(rows) == 20
    _labelled(coll, rows[:2], lambda r: True)
    at.text_input(key="concept_name").input(CONCEPT).run()  # its label set is read back
    assert at.session_state["concept_labels"][coll] == {r["key"]: 1 for r in rows[:2]}
    at.button(key="concept_train").click().run()
    assert "negative" in messages(at) and not at.exception  # positives only: refused on the page
    _labelled(coll, rows, lambda r: r["color"] == "red")
    at.text_input(key="concept_query").input("a blue square").run()
    labels = _labelled(coll, results(at)[:10], lambda r: r["color"] == "red")
    at = run_app(coll, "pages/concepts.py", concept_name=CONCEPT)  # a reload loses nothing
    assert at.session_state["concept_labels"][coll] == labels
    assert sum(labels.values()) >= 3 and len(labels) - sum(labels.values()) >= 3
    at.text_input(key="concept_query").input("a blue square").run()
    shown = json.loads(grids(at)[0].proto.json)
    assert shown["mode"] == "label" and shown["labels"] == labels  # the grid shows them
    at.button(key="concept_train").click().run()
    assert not at.exception and not at.error
    metrics = {m.label: m.value for m in at.metric}
    assert (
        metrics["Quality"] in ("excellent", "good", "fair", "poor")
        and float(metrics["Threshold"]) > 0
    )
    cards = results(_scored(at))  # the find grid, then the ranking, then the suggestions
    ranked = [r for r in cards if "score" in r][:20]
    assert not any(n.endswith(".labels") for n in saved_concepts(coll))
    assert sum(r["color"] == "red" for r in ranked[:10]) >= 8
    assert [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)
    assert not os.path.exists(S.InsightLayout(coll).concept(CONCEPT))
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Above threshold"].endswith(f" of {len(read_keys(coll)):,}")
    at.button(key="concept_save").click().run()
    assert os.path.exists(S.InsightLayout(coll).concept(CONCEPT)) and "Saved" in messages(at)
    assert "curation.concept" in " ".join(c.value for c in at.code)
    # saved by the encoder process from the scores it ranked with: the collection's own scores
    concept = load_concept(coll, CONCEPT)
    saved = pq.read_table(S.InsightLayout(coll).concept_scores(CONCEPT))
    scores = score_collection(coll, concept)
    assert saved.column(S.KEY).to_pylist() == list(read_keys(coll))
    assert np.allclose(saved.column(S.CONCEPT_SCORE).to_numpy(), scores)
    above = int((scores >= concept.threshold).sum())
    assert metrics["Above threshold"] == f"{above:,} of {len(scores):,}"


def test_explore_map_selection_lists_samples_and_becomes_a_region(coll, tmp_path):
    bare = str(tmp_path / "bare")
    shutil.copytree(coll, bare, ignore=shutil.ignore_patterns("map"))
    at = run_app(bare, "pages/explore.py")
    assert "python -m curation.map" in messages(at) and not at.exception
    x = _red_x(coll)
    region = {"modality": "image", "rect": [x - 0.5, -1.0, x + 0.5, 10.0]}
    at = run_app(coll, "pages/explore.py", explore_region=region)
    assert not at.exception and not at.error, (at.exception, messages(at))
    charts = [
        e for e in at.main if type(e).__name__ == "UnknownElement" and e.type == "plotly_chart"
    ]
    assert len(charts) == 1
    listed = results(at)
    assert listed and all(r["color"] == "red" for r in listed), [r["color"] for r in listed]
    at.button(key="explore_use_region").click().run()
    assert at.session_state["subset_spec"][coll]["region"] == region and "Added" in messages(at), (
        messages(at)
    )


def test_subset_page_counts_each_clause_saves_and_exports(coll, tmp_path):
    roots = roots_of([coll, str(tmp_path)])
    at = run_app(coll, "pages/subset.py", subset_spec={coll: {}}, data_roots=roots)
    assert not at.exception
    with Catalog(coll) as cat:
        embedded, red = cat.count("id IS NOT NULL"), cat.count("color = 'red' AND id IS NOT NULL")
    steps = at.dataframe[0].value
    assert len(steps) == 1 and steps["rows"][0] == embedded
    at.selectbox(key="subset_kind").select("filters").run()
    at.text_input(key="subset_filter_overrides").input("{bogus: 1}").run()
    at.button(key="subset_add").click().run()
    assert "bogus" in messages(at) and not at.session_state["subset_spec"][coll]
    at.selectbox(key="subset_kind").select("where").run()
    at.text_input(key="subset_where").input("no_such_column > 1").run()
    at.button(key="subset_add").click().run()
    # refused when added: dry-run in the sandbox, the error at the form, the spec unchanged
    assert "no_such_column" in messages(at) and not at.exception
    assert not at.session_state["subset_spec"][coll]
    at.text_input(key="subset_where").input("color = 'red'").run()
    at.button(key="subset_add").click().run()
    assert at.dataframe[0].value["rows"].tolist()[-1] == red and not at.error
    at.selectbox(key="subset_kind").select("concept").run()
    at.button(key="subset_add").click().run()
    at.selectbox(key="subset_kind").select("knn").run()
    at.text_input(key="subset_knn_text").input("a red circle").run()
    at.number_input(key="subset_knn_k").set_value(12).run()
    at.button(key="subset_add").click().run()
    at.selectbox(key="subset_kind").select("dedup").run()
    at.selectbox(key="subset_dedup_level").select("exact").run()
    at.button(key="subset_add").click().run()
    assert not at.error, messages(at)
    steps = at.dataframe[0].value
    labels = steps["clause"].tolist()
    assert (
        labels[1].startswith("where")
        and labels[2].startswith("concept")
        and labels[3].startswith("dedup")
    )
    assert labels[4].startswith("knn") and steps["rows"].tolist()[-1] <= 12
    shown = results(at)
    assert shown and all(r["color"] == "red" for r in shown)

    at.button(key="subset_save").click().run()
    assert "name" in messages(at) and not os.path.exists(S.CollectionLayout(coll).subset("reds"))
    at.text_input(key="subset_name").input("reds").run()
    at.button(key="subset_save").click().run()
    saved = S.CollectionLayout(coll).subset("reds")
    doc = yaml.safe_load(open(saved))
    assert doc["name"] == "reds" and doc["where"] == ["color = 'red'"] and doc["knn"][0]["k"] == 12
    count = steps["rows"].tolist()[-1]
    assert len(resolve(coll, "reds", untrusted=True)) == count

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    at.text_input(key="subset_out_reds").input(str(blocker / "export")).run()
    at.button(key="subset_export").click().run()
    assert (
        "not writable" in messages(at)
        and not at.exception
        and blocker.read_text() == "not a folder"
    )
    out = tmp_path / "export"
    at.text_input(key="subset_out_reds").input(str(out)).run()
    at.button(key="subset_export").click().run()
    assert not at.error, messages(at)
    manifest = yaml.safe_load((out / S.EXPORT_MANIFEST).read_text())
    assert manifest[S.MANIFEST_COUNT] == count and sorted(p.name for p in out.glob("*.tar")) == [
        "00000.tar"
    ]
    code = " ".join(c.value for c in at.code)
    assert f"python -m hdit_train.train --data {out} --config" in code and "curation.export" in code
    at.button(key="subset_remove_knn_0").click().run()
    assert "changed since reds was saved" in messages(at) and not at.exception


def test_a_ranking_is_scored_nicer_than_the_rest_of_the_encoder():
    """Linux keeps a nice value per thread: the ranking's thread alone is lowered."""
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen = []

    def rank() -> None:
        encoder._background()
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    worker = threading.Thread(target=rank)
    worker.start()
    worker.join()
    assert seen == [min(19, before + encoder.NICER)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before
