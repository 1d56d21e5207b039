"""The Subset page's checks and drafts and the Explore page's picks, through AppTest: a clause
is dry-run when added and refused with its error, a spec that does not run is never saved,
drafts live in the collection (a new session starts from them), the export's overwrite control
and complete command, a histogram range becoming a where clause, and no torch in the app."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import yaml

from collection import schema as S
from curation.catalog import Catalog
from curation.concept_probe import fit_concept, load_concept, score_collection
from curation.concept_scores import save_concept, saved_passing
from curation.resolve import resolve
from curation.vectors import read_keys, write_table
from tests.webui_app import REPO, messages, run_app
from webui.draft import draft_path
from webui.picks import picked_range, where_of
from webui.roots import roots_of


@pytest.fixture(scope="module")
def coll(demo_collection, tmp_path_factory) -> str:
    """A copy of the demo-sized collection: these tests write subsets/ and exports."""
    root = str(tmp_path_factory.mktemp("subset-page") / "collection")
    shutil.copytree(demo_collection["demo/collection"], root)
    return root


def _where(at, sql: str) -> None:
    at.selectbox(key="subset_kind").select("where").run()
    at.text_input(key="subset_where").input(sql).run()
    at.button(key="subset_add").click().run()


def test_an_invalid_clause_is_refused_when_added_and_a_draft_survives_a_new_session(coll):
    at = run_app(coll, "pages/subset.py")
    _where(at, "DROP TABLE samples")
    assert at.error and not at.exception
    assert not at.session_state["subset_spec"][coll]  # refused: nothing kept, nothing drafted
    assert not os.path.exists(draft_path(coll))
    _where(at, "width >= 32")
    _where(at, "color = 'red'")
    at.text_input(key="subset_name").input("reds").run()
    doc = json.load(open(draft_path(coll)))
    assert doc["clauses"] == {"where": ["width >= 32", "color = 'red'"]} and doc["name"] == "reds"

    again = run_app(coll, "pages/subset.py")  # a new session: a reload of the page
    assert again.session_state["subset_spec"][coll] == doc["clauses"] and not again.exception
    assert again.text_input(key="subset_name").value == "reds"
    with Catalog(coll) as cat:
        red = cat.count("id IS NOT NULL AND width >= 32 AND color = 'red'")
    assert again.dataframe[0].value["rows"].tolist()[-1] == red
    again.button(key="subset_remove_where_1").click().run()
    assert json.load(open(draft_path(coll)))["clauses"] == {"where": ["width >= 32"]}


def test_a_spec_that_does_not_run_is_not_saved_and_its_clause_shows_the_error(coll):
    draft = {"name": "broken", "clauses": {"where": ["width >= 32", "no_such_column > 1"]}}
    os.makedirs(os.path.dirname(draft_path(coll)), exist_ok=True)
    with open(draft_path(coll), "w") as f:
        json.dump(draft, f)
    at = run_app(coll, "pages/subset.py")
    assert "no_such_column" in messages(at) and not at.exception
    at.button(key="subset_save").click().run()
    assert "not saved" in messages(at)
    assert not os.path.exists(S.CollectionLayout(coll).subset("broken"))
    at.button(key="subset_remove_where_1").click().run()
    at.button(key="subset_save").click().run()
    assert os.path.exists(S.CollectionLayout(coll).subset("broken")), messages(at)


def test_export_overwrite_control_and_the_complete_command(coll, tmp_path):
    out = tmp_path / "export"
    roots = roots_of([coll, str(tmp_path)])
    at = run_app(coll, "pages/subset.py", subset_spec={coll: {}}, data_roots=roots)
    for name, sql in (("wide", "width >= 48"), ("narrow", "width < 48")):
        at.button(key="subset_remove_where_0").click().run() if name == "narrow" else None
        _where(at, sql)
        at.text_input(key="subset_name").input(name).run()
        at.button(key="subset_save").click().run()
        at.text_input(key=f"subset_out_{name}").input(str(out)).run()
        at.number_input(key="subset_shard_size").set_value(50).run()
        at.button(key="subset_export").click().run()
        if name == "wide":
            assert not at.error, messages(at)
    text = messages(at)
    assert "Overwrite an existing export" in text and "--" not in text  # the page's words
    at.toggle(key="subset_overwrite").set_value(True).run()
    at.button(key="subset_export").click().run()
    assert not at.error, messages(at)
    manifest = yaml.safe_load((out / S.EXPORT_MANIFEST).read_text())
    with Catalog(coll) as cat:
        assert manifest[S.MANIFEST_COUNT] == cat.count("id IS NOT NULL AND width < 48")
    code = " ".join(c.value for c in at.code)
    assert "--shard-size 50" in code and "--overwrite" in code and "--untrusted" in code


def test_a_histogram_range_becomes_a_where_clause(coll):
    hist = {"edges": [0.0, 1.0, 2.0, 3.0], "counts": [5, 7, 11]}
    pick = picked_range(hist, "width", {"range": {"from": [0.4, 1.6]}})
    assert pick == {"column": "width", "low": 0.0, "high": 2.0, "rows": 12, "last": False}
    last = picked_range(hist, "width", {"bin": [{"from": 2.0, "to": 3.0}]})
    assert last["rows"] == 11 and where_of(last) == "width >= 2.0 AND width <= 3.0"
    assert picked_range(hist, "width", {}) is None

    pick = {"column": "width", "low": 48.0, "high": 64.0, "rows": 0, "last": True}
    at = run_app(coll, "pages/explore.py", subset_spec={coll: {}}, explore_hist_pick=pick)
    assert not at.exception, at.exception
    at.button(key="explore_use_range").click().run()
    assert at.session_state["subset_spec"][coll] == {"where": [where_of(pick)]}, messages(at)
    at.switch_page("pages/subset.py").run()
    with Catalog(coll) as cat:
        wide = cat.count("id IS NOT NULL AND width >= 48 AND width <= 64")
    assert at.dataframe[0].value["rows"].tolist()[-1] == wide


def test_the_app_never_imports_torch_on_its_pages(coll):
    """Search (CLIP through the encoder process), Explore and Subset, in a fresh process."""
    script = f"""
import sys
from tests.webui_app import results, run_app
at = run_app({coll!r}, "pages/search.py")
at.text_input(key="search_text").input("a red circle").run()
assert results(at) and not at.exception, (at.exception, at.error)
for page in ("pages/explore.py", "pages/subset.py"):
    at.switch_page(page).run()
    assert not at.exception, at.exception
print(sorted(m for m in ("torch", "open_clip") if m in sys.modules))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_a_concept_clause_resolves_in_the_app_without_torch(coll):
    """From the scores saved with the concept, and through the encoder process for one saved
    without them; the counts are the CLI's (which scores here when it must)."""
    with Catalog(coll) as cat:
        red = cat.query("SELECT key FROM samples WHERE color = 'red' LIMIT 6").table
        other = cat.query("SELECT key FROM samples WHERE color <> 'red' LIMIT 6").table
    pos, neg = red.column(S.KEY).to_pylist(), other.column(S.KEY).to_pylist()
    expected = {}
    for name, with_scores in (("reds-saved", True), ("reds-bare", False)):
        concept = fit_concept(coll, name, pos, neg, seed=1)
        save_concept(coll, concept, score_collection(coll, concept) if with_scores else None)
        expected[name] = len(resolve(coll, {"name": "c", "concept": [{"name": name}]}, keys=False))
    assert 0 < expected["reds-saved"] and os.path.exists(
        S.InsightLayout(coll).concept_scores("reds-saved")
    )
    assert not os.path.exists(S.InsightLayout(coll).concept_scores("reds-bare"))
    assert saved_passing(coll, load_concept(coll, "reds-saved"), 0.5) is not None
    other_model = fit_concept(coll, "reds-saved", pos[:3], neg[:3], seed=2)
    assert saved_passing(coll, other_model, 0.5) is None  # not the scores of this model
    script = f"""
import sys
from tests.webui_app import messages, run_app
for name in ("reds-saved", "reds-bare"):
    spec = {{{coll!r}: {{"concept": [{{"name": name}}]}}}}
    at = run_app({coll!r}, "pages/subset.py", subset_spec=spec)
    assert not at.exception and not at.error, (at.exception, messages(at))
    print(name, at.dataframe[0].value["rows"].tolist()[-1])
print(sorted(m for m in ("torch", "open_clip") if m in sys.modules))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    *counts, loaded = done.stdout.strip().splitlines()[-3:]
    assert loaded == "[]"
    assert dict((n, int(c)) for n, c in (line.split() for line in counts)) == expected


def test_a_long_region_clause_leaves_the_row_counts_in_view(coll):
    keys = read_keys(coll)
    rng = np.random.default_rng(0)
    table = {
        S.KEY: pa.array(list(keys)),
        S.MAP_X: pa.array(rng.uniform(-1, 1, len(keys)), pa.float32()),
        S.MAP_Y: pa.array(rng.uniform(-1, 1, len(keys)), pa.float32()),
        S.MAP_CLUSTER: pa.array(np.zeros(len(keys), np.int32)),
    }
    write_table(S.InsightLayout(coll).map(S.MODALITY_IMAGE), pa.table(table))
    turns = np.linspace(0, 2 * np.pi, 300, endpoint=False)
    lasso = [[float(5 * np.cos(t)), float(5 * np.sin(t))] for t in turns]  # around every point
    region = {"modality": "image", "polygon": lasso}
    at = run_app(coll, "pages/subset.py", subset_spec={coll: {"region": region}})
    assert not at.exception and not at.error, messages(at)
    steps = at.dataframe[0].value
    assert list(steps.columns) == ["rows", "clause"]  # the count first, whatever the label
    assert steps["rows"].tolist()[-1] == steps["rows"].tolist()[0]
    assert max(len(label) for label in steps["clause"]) <= 80
    shown = " ".join(c.value for c in at.code)
    assert "300 points" in shown and len(shown) < 400


def test_samples_sent_from_a_grid_become_a_keys_clause(coll):
    keys = [str(k) for k in read_keys(coll)[[3, 10, 42]]]
    sent = {"path": coll, "keys": keys, "source": "Search"}
    at = run_app(coll, "pages/subset.py", subset_spec={coll: {}}, subset_inbox=sent)
    assert "3 samples sent from Search" in messages(at)
    at.button(key="subset_inbox_add").click().run()
    assert not at.exception, at.exception
    assert at.session_state["subset_spec"][coll] == {"keys": keys}
    assert "subset_inbox" not in at.session_state
    assert at.dataframe[0].value["rows"].tolist()[-1] == 3

    bad = {"path": coll, "keys": ["no-such-key"], "source": "SQL"}
    at = run_app(coll, "pages/subset.py", subset_spec={coll: {}}, subset_inbox=bad)
    at.button(key="subset_inbox_add").click().run()
    assert "no-such-key" in messages(at) and at.session_state["subset_spec"][coll] == {}
