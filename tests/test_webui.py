"""The web UI, page by page, through Streamlit's AppTest (the script runs in this process, as
a browser session would drive it): search results and toggles, bad input shown on the page,
SQL, Explore's figures. The real-browser test is tests/test_webui_browser.py."""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from streamlit.testing.v1 import AppTest

from collection import schema as S
from tests.webui_app import APP, TIMEOUT, cards, messages, results, run_app
from webui.roots import roots_of


def files_under(root: str) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))


@pytest.fixture(scope="module")
def coll(demo_collection) -> str:
    return demo_collection["demo/collection"]


@pytest.fixture(scope="module")
def search(coll):
    """A search page answering "a red circle" (shared: each test changes one thing and reruns)."""
    at = run_app(coll)
    at.text_input(key="search_text").input("a red circle").run()
    assert not at.exception, at.exception
    return at


def test_a_red_circle_puts_red_circles_first(search):
    rows = results(search)
    assert len(rows) == 20 and not search.error
    assert (rows[0]["color"], rows[0]["shape"]) == ("red", "circle")
    assert sum(r["color"] == "red" or r["shape"] == "circle" for r in rows[:10]) >= 8
    sims = [r["similarity"] for r in rows]
    assert sims == sorted(sims, reverse=True)
    shown = cards(search)
    assert shown[0]["caption"] == rows[0]["caption"] and shown[0]["line"].startswith("similarity")
    assert all(c["src"].startswith("data:image/jpeg;base64,") for c in shown)  # read from shards


def test_thumbnails_come_from_the_source_shards(search, coll, monkeypatch):
    from collection import images as I
    from webui import thumbs as T

    rows = results(search)[:3]
    assert all(r[S.SOURCE_OFFSET] is not None for r in rows)
    scanned = []
    monkeypatch.setattr(
        I, "_scan", lambda url, keys, scan=I._scan: scanned.append(keys) or scan(url, keys)
    )
    ranged = T.thumbnails(rows)
    assert (
        all(t.jpeg and t.jpeg.startswith(b"\xff\xd8") for t in ranged) and not scanned
    )  # by byte range
    moved = [
        dict(r, source_offset=r[S.SOURCE_OFFSET] + 1) for r in rows
    ]  # bytes that fail the sha256
    unranged = [dict(r, source_offset=None) for r in rows]
    assert [t.jpeg for t in T.thumbnails(moved)] == [t.jpeg for t in T.thumbnails(unranged)] == [
        t.jpeg for t in ranged
    ] and len(scanned) == 2  # found by key instead, the same pictures
    gone = T.thumbnails([dict(rows[0], source_shard=rows[0]["source_shard"] + ".missing")])
    assert gone[0].jpeg is None and "gone" in gone[0].why


def test_toggles_change_the_results(search):
    search.text_input(key="search_text").input("a blue square").run()
    shown = results(search)
    assert any(r[S.PWATERMARK] > 0.8 for r in shown)
    search.toggle(key="search_hide_wm").set_value(True).run()
    hidden = results(search)
    assert len(hidden) == 20 and all(r[S.PWATERMARK] <= 0.8 for r in hidden)
    assert [r["id"] for r in hidden] != [r["id"] for r in shown]
    search.radio(key="search_modality").set_value("text").run()
    assert [r["id"] for r in results(search)] != [r["id"] for r in hidden]
    search.radio(key="search_modality").set_value("image").run()
    search.toggle(key="search_hide_wm").set_value(False).run()
    search.number_input(key="search_k").set_value(7).run()
    assert [r["id"] for r in results(search)] == [r["id"] for r in shown[:7]]
    search.number_input(key="search_k").set_value(20).run()


def test_more_like_this_searches_with_that_result(search):
    search.text_input(key="search_text").input("a red circle").run()
    third = results(search)[2]
    # what the grid's "More like this" does with the card under its cursor (AppTest cannot
    # press it; tests/test_webui_grid_browser.py does)
    search.session_state["search_like"] = {k: third[k] for k in ("id", "key", "caption")}
    search.session_state["search_kind"] = "like"
    search.run()
    rows = results(search)
    assert rows[0]["id"] == third["id"] and rows[0]["similarity"] == pytest.approx(1.0, abs=1e-3)
    assert "More like" in messages(search)
    search.button(key="search_clear_like").click().run()
    assert results(search)[2]["id"] == third["id"]


def test_sql_filter_errors_and_empty_answers_are_messages(search, coll):
    before = files_under(coll)
    search.text_input(key="search_filter").input("no_such_column > 1").run()
    assert not search.exception and "no_such_column" in messages(search) and not results(search)
    search.text_input(key="search_filter").input("id < 0").run()
    assert "No results" in messages(search) and not results(search)
    search.text_input(key="search_filter").input("width >= 64 AND id % 2 = 0").run()
    rows = results(search)
    assert rows and all(r["id"] % 2 == 0 for r in rows)
    search.text_input(key="search_filter").input("").run()
    search.text_input(key="search_text").input("blurry:-1").run()
    assert "positive weight" in messages(search)
    search.text_input(key="search_text").input("a red circle").run()
    assert files_under(coll) == before


def test_image_upload_and_path_searches_and_bad_images(coll, demo_collection, tmp_path):
    import io

    from PIL import Image

    from models.scenes import make_sample

    img = make_sample(7, seed=99).image
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    at = run_app(coll, data_roots=roots_of([coll, str(tmp_path)]))
    at.file_uploader(key="search_upload").upload("query.png", buf.getvalue(), "image/png").run()
    assert not at.exception and len(results(at)) == 20
    at.file_uploader(key="search_upload").upload("notes.txt", b"just some text", "text/plain").run()
    assert "notes.txt" in messages(at) and not results(at)
    at.file_uploader(key="search_upload").upload("cut.jpg", buf.getvalue()[:40], "image/jpeg").run()
    assert "cut.jpg" in messages(at) and not results(at)
    at.file_uploader(key="search_upload").set_value(None).run()
    at.text_input(key="search_path").input(str(tmp_path / "absent.png")).run()
    assert "cannot read" in messages(at) and not at.exception
    path = tmp_path / "q.png"
    Image.open(io.BytesIO(buf.getvalue())).save(path)
    at.text_input(key="search_path").input(str(path)).run()
    assert len(results(at)) == 20 and not at.error


def test_sql_page_runs_queries_and_shows_errors_plainly(coll):
    at = run_app(coll, "pages/sql.py")
    at.text_area(key="sql_text").input(
        "SELECT status, count(*) AS n FROM samples GROUP BY 1 ORDER BY 1"
    ).run()
    at.button(key="sql_run").click().run()
    assert not at.error and not at.exception
    frame = at.dataframe[0].value
    assert set(frame["status"]) == {"ok", "decode_error"} and frame["n"].sum() == 300
    at.text_area(key="sql_text").input("SELEC nonsense FROM samples").run()
    at.button(key="sql_run").click().run()
    assert len(at.error) == 1 and "syntax" in at.error[0].value.lower() and not at.exception
    at.text_area(key="sql_text").input("COPY samples TO '/tmp/x.csv'").run()
    at.button(key="sql_run").click().run()
    assert len(at.error) == 1 and not at.exception and not os.path.exists("/tmp/x.csv")


def test_explore_counts_and_histograms(coll):
    at = run_app(coll, "pages/explore.py")
    assert not at.exception and not at.error
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Rows"] == "300" and int(metrics["Failed"]) > 0
    assert metrics["Embedded (ok)"] == str(300 - int(metrics["Failed"]))
    charts = [
        e for e in at.main if type(e).__name__ == "UnknownElement" and e.type == "vega_lite_chart"
    ]
    assert len(charts) == 6  # clip_similarity, pwatermark, ptoxic, width, height, caption_length
    assert "punsafe: no values" in " ".join(
        c.value for c in at.caption
    )  # embedded without the nsfw score


def test_stats_histograms_are_aggregates(coll):
    from curation import stats
    from curation.catalog import Catalog

    with Catalog(coll) as cat:
        h = stats.histogram(cat, S.PWATERMARK, bins=10)
        assert h.edges[0] == 0.0 and h.edges[-1] == 1.0 and len(h.counts) == 10
        assert sum(h.counts) + h.missing == h.total == 300
        wm = cat.count(f"{S.PWATERMARK} >= 0.9")
        assert h.counts[-1] == wm
        ln = stats.histogram(cat, "caption_length", bins=5)
        assert sum(ln.counts) == cat.count(f"{S.CAPTION} IS NOT NULL")
        unscored = stats.histogram(cat, S.PUNSAFE)
        assert unscored.counts == [] and unscored.missing == unscored.total == 300
        with pytest.raises(ValueError, match="expected one of"):
            stats.histogram(cat, "url")


def test_a_missing_collection_names_the_command_that_builds_it(tmp_path, monkeypatch):
    from webui import state

    monkeypatch.setattr(sys, "argv", ["app.py"])
    at = run_app(None)
    assert at.session_state["collections"] == [state.DEFAULT_COLLECTION]
    if not os.path.isdir(state.DEFAULT_COLLECTION):
        assert "make demo" in messages(at)
    at = run_app(str(tmp_path / "nowhere"))
    assert (
        "does not exist" in messages(at) and "pipelines.embed" in messages(at) and not at.exception
    )
    for page in ("pages/sql.py", "pages/explore.py"):
        at.switch_page(page).run()
        assert "does not exist" in messages(at) and not at.exception
    assert not (tmp_path / "nowhere").exists()


def test_a_half_built_collection_says_what_is_missing(coll, tmp_path):
    root = tmp_path / "half"
    shutil.copytree(coll, root, ignore=shutil.ignore_patterns("indices"))
    at = run_app(str(root))
    assert "indices.build" in messages(at) and not at.exception
    at.switch_page("pages/sql.py").run()
    at.button(key="sql_run").click().run()
    assert not at.error and at.dataframe
    for d in ("img_emb", "text_emb"):
        shutil.rmtree(root / d)
    at = run_app(str(root))
    assert "no embeddings" in messages(at) and not at.exception
    shutil.rmtree(root / "_done")
    at = run_app(str(root))
    assert "no complete parts" in messages(at) and not at.exception


def test_several_collections_can_be_opened_and_switched(coll, tmp_path):
    # AppTest keeps the sidebar of a file-page app only on the first run of each AppTest, so each
    # sidebar interaction starts a fresh one (a browser shows it on every run)
    other = str(tmp_path / "other")
    shutil.copytree(coll, other)
    roots = roots_of([coll, str(tmp_path)])
    at = run_app(coll, data_roots=roots)
    at.sidebar.text_input(key="open_path").input(str(tmp_path / "absent")).run()
    assert "no such folder" in at.session_state["open_error"] and at.session_state[
        "collections"
    ] == [coll]
    at = run_app(coll, open_error=at.session_state["open_error"])
    assert "no such folder" in " ".join(e.value for e in at.sidebar.error)
    at = run_app(coll)  # the default roots are the collections opened: `other` is outside
    at.sidebar.text_input(key="open_path").input(other).run()
    assert "data roots" in at.session_state["open_error"]
    at = run_app(coll, data_roots=roots)
    at.sidebar.text_input(key="open_path").input(other).run()
    assert at.session_state["collection"] == other and at.session_state["collections"] == [
        coll,
        other,
    ]
    at.text_input(key="search_text").input("a red circle").run()
    assert len(results(at)) == 20 and not at.error
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.session_state["collections"] = [other, coll]
    at.session_state["search_text"] = "a red circle"
    at.run()
    labels = at.sidebar.selectbox(key="collection").options  # parent/name of each open collection
    assert len(labels) == 2 and labels[0].endswith("/other") and labels[1].endswith("/collection")
    assert at.session_state["collection"] == other
    at.sidebar.selectbox(key="collection").select_index(1).run()
    assert at.session_state["collection"] == coll and len(results(at)) == 20


def test_ast_parse_is_serialised_while_the_app_loads_in_threads():
    import ast
    import threading

    from webui import ast_guard, state  # noqa: F401 - state installs the guard

    if sys.version_info >= (3, 13):
        pytest.skip("CPython 3.13 keeps the AST converter's depth per thread")
    assert ast.parse is ast_guard.locked_parse and ast.literal_eval("{'shape': (2, 3)}") == {
        "shape": (2, 3)
    }
    inside = threading.Event()
    with ast_guard._LOCK:  # another thread's parse waits for the lock holder
        t = threading.Thread(target=lambda: (ast.parse("x = 1"), inside.set()))
        t.start()
        assert not inside.wait(0.2)
    t.join(5)
    assert inside.is_set()


def test_sql_results_with_keys_or_ids_become_the_grid(coll):
    at = run_app(coll, "pages/sql.py")
    at.text_area(key="sql_text").input(
        "SELECT key, color FROM samples WHERE color = 'red' ORDER BY key LIMIT 5"
    ).run()
    at.button(key="sql_run").click().run()
    rows = results(at)
    assert len(rows) == 5 and all(r["color"] == "red" for r in rows) and not at.error
    assert [r["key"] for r in rows] == sorted(r["key"] for r in rows)  # in the result's order
    kept = at.session_state["sql_result"]  # what the page shows, not the result's table
    assert not any(isinstance(v, pa.Table) for v in kept.values()) and len(kept["ids"]) == 5
    at.text_area(key="sql_text").input("SELECT 99999999 AS id").run()
    at.button(key="sql_run").click().run()
    assert "out of range" in messages(at) and not results(at) and not at.exception
    at.text_area(key="sql_text").input("SELECT status, count(*) AS n FROM samples GROUP BY 1").run()
    at.button(key="sql_run").click().run()
    assert not results(at) and not at.error  # no key or id column: the table alone


def test_weak_and_hidden_results_are_said(coll):
    at = run_app(coll)
    at.text_input(key="search_text").input("a bowl of ramen").run()
    note = next(c.value for c in at.caption if "results from the" in c.value)
    shown = cards(at)
    weak = sum(c["weak"] for c in shown)
    assert weak == len(shown) and "weak: no result reaches" in note
    at.text_input(key="search_text").input("a red circle").run()
    assert not cards(at)[0]["weak"]

    def said() -> str:
        return next(c.value for c in at.caption if "results from the" in c.value)

    at.text_input(key="search_text").input("a blue square").run()  # watermarked ones among them
    at.toggle(key="search_dedup").set_value(False).run()
    at.toggle(key="search_safe").set_value(False).run()
    assert "hidden" not in said()  # nothing can hide a result now
    at.toggle(key="search_hide_wm").set_value(True).run()
    assert re.search(r"hidden: \d+ by watermark", said()), said()
