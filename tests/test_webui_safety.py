"""The web UI reaches only its own data and shows nothing taken down: typed paths stay under
the data roots (refused alike whether or not they exist), the SQL page survives every DuckDB
type, and a takedown applies to the very next rerun of the Search, SQL and Explore pages."""

from __future__ import annotations

import io
import os
import shutil

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from collection import schema as S, takedown as T
from collection.procfs import listening_sockets
from curation.subset import save_subset
from curation.vectors import read_keys, write_table
from tests.webui_app import messages, results, run_app
from webui import roots as R


@pytest.fixture(scope="module")
def coll(demo_collection, tmp_path_factory) -> str:
    """A copy of the demo-sized collection (these tests list keys as taken down) with a map."""
    root = str(tmp_path_factory.mktemp("safety") / "collection")
    shutil.copytree(demo_collection["demo/collection"], root)
    keys = read_keys(root)
    xy = np.random.default_rng(0).uniform(0, 1, (len(keys), 2)).astype(np.float32)
    write_table(
        S.InsightLayout(root).map(S.MODALITY_IMAGE),
        pa.table(
            {
                S.KEY: pa.array(list(keys)),
                S.MAP_X: pa.array(xy[:, 0]),
                S.MAP_Y: pa.array(xy[:, 1]),
                S.MAP_CLUSTER: pa.array(np.zeros(len(keys), np.int32)),
            }
        ),
    )
    return root


def png(path) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (220, 20, 20)).save(buf, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return str(path)


@pytest.mark.parametrize("what", ["image", "export"])
def test_paths_outside_the_roots_are_refused_alike_whether_or_not_they_exist(tmp_path, what):
    inside, outside = tmp_path / "root", tmp_path / "outside"
    real = png(outside / "q.png") if what == "image" else str(outside)
    roots = R.roots_of([str(inside)])
    call = R.read_image if what == "image" else R.export_folder
    refusals = []
    for typed in (real, str(outside / "absent.png"), f"{inside}/../outside/q.png", "/etc/passwd"):
        with pytest.raises(R.OutsideRoots) as err:
            call(typed, roots)
        refusals.append(str(err.value))
    assert len(set(refusals)) == 1 and "data roots" in refusals[0]
    assert str(outside) not in refusals[0] and "q.png" not in refusals[0]
    if what == "image":
        assert R.read_image(png(inside / "q.png"), roots).startswith(b"\x89PNG")
    else:
        assert R.export_folder(str(inside / "new"), roots) == str(inside.resolve() / "new")


def test_the_image_path_box_reads_only_under_the_roots(coll, tmp_path):
    outside = png(tmp_path / "outside" / "q.png")
    at = run_app(coll)
    shown = []
    for typed in (outside, str(tmp_path / "outside" / "absent.png")):
        at.text_input(key="search_path").input(typed).run()
        assert not at.exception and not results(at)
        shown.append([e.value for e in at.error])
    assert shown[0] == shown[1] and "data roots" in shown[0][0]
    inside = png(tmp_path / "root" / "q.png")
    at = run_app(coll, data_roots=R.roots_of([coll, str(tmp_path / "root")]))
    at.text_input(key="search_path").input(inside).run()
    assert len(results(at)) == 20 and not at.error


def test_search_drops_a_taken_down_result_on_the_next_rerun(coll):
    at = run_app(coll)
    at.text_input(key="search_text").input("a green triangle").run()
    first = results(at)[0]
    T.add(coll, keys=[first[S.KEY]], reason="test")
    try:
        at.run()  # no wait: the page checks the list on every rerun
        assert first["id"] not in [r["id"] for r in results(at)] and len(results(at)) == 20
    finally:
        T.remove(coll, keys=[first[S.KEY]])


SQL_TYPES = (
    "SELECT DATE 'infinity' AS d, union_value(b := 'x')::UNION(a INT, b VARCHAR) AS u, "
    "{'a': [1, 2]} AS s, MAP {'k': 1} AS m, '\\xAA'::BLOB AS b, "
    "(2::HUGEINT ** 100)::HUGEINT AS h"
)


def test_the_sql_page_shows_every_type_and_bounds_a_list_aggregate(coll):
    at = run_app(coll, "pages/sql.py")
    at.text_area(key="sql_text").input(SQL_TYPES).run()
    at.button(key="sql_run").click().run()
    assert not at.exception and not at.error, messages(at)
    row = at.dataframe[0].value.iloc[0]
    assert (row["d"], row["u"], row["s"], row["m"]) == ("infinity", "x", "{'a': [1, 2]}", "{'k'=1}")
    at.text_area(key="sql_text").input("SELECT list(key) AS keys FROM samples, range(300)").run()
    at.button(key="sql_run").click().run()
    assert not at.exception and not at.error, messages(at)
    cell = at.dataframe[0].value.iloc[0]["keys"]
    assert len(cell) == 1001 and cell.endswith("…")
    assert "cut at 1,000 characters" in " ".join(c.value for c in at.caption)


def test_the_sql_page_drops_its_result_when_the_takedown_list_changes(coll):
    at = run_app(coll, "pages/sql.py")
    at.text_area(key="sql_text").input("SELECT key FROM samples ORDER BY key LIMIT 3").run()
    at.button(key="sql_run").click().run()
    key = at.dataframe[0].value["key"][0]
    T.add(coll, keys=[key])
    try:
        at.run()
        assert not at.dataframe and "takedown list changed" in messages(at)
        at.button(key="sql_run").click().run()
        assert key not in set(at.dataframe[0].value["key"])
    finally:
        T.remove(coll, keys=[key])


def _map_spec(at) -> str:
    charts = [e for e in at.main if getattr(e, "type", None) == "plotly_chart"]
    assert len(charts) == 1
    return charts[0].proto.spec


def test_the_explore_map_hides_taken_down_keys_on_the_next_rerun(coll):
    at = run_app(coll, "pages/explore.py")
    assert not at.exception, at.exception
    key = read_keys(coll)[5]
    assert f'"{key}"' in _map_spec(at)
    T.add(coll, keys=[key])
    try:
        at.run()
        assert f'"{key}"' not in _map_spec(at) and f'"{read_keys(coll)[6]}"' in _map_spec(at)
    finally:
        T.remove(coll, keys=[key])


@pytest.fixture(scope="module")
def exported(coll, tmp_path_factory) -> dict:
    """The Subset page's export: refused outside the roots (alike for a folder that exists and
    one that does not, nothing written), then made at the default folder inside them."""
    save_subset(coll, {"name": "few", "limit": 5})
    outside = tmp_path_factory.mktemp("outside")
    at = run_app(
        coll,
        "pages/subset.py",
        subset_spec={coll: {"limit": 5}},
        subset_saved={coll: ("few", {"limit": 5}, "")},
    )
    default = at.text_input(key="subset_out_few").value
    errors = []
    for typed in (str(outside), str(outside / "new")):
        at.text_input(key="subset_out_few").input(typed).run()
        at.button(key="subset_export").click().run()
        errors.append([e.value for e in at.error])
    assert errors[0] == errors[1] and "data roots" in errors[0][0]
    assert os.listdir(outside) == []
    at.text_input(key="subset_out_few").input(default).run()
    at.button(key="subset_export").click().run()
    assert not at.error and not at.exception, messages(at)
    return {"out": default, "root": coll}


def test_the_export_folder_defaults_inside_the_roots(exported):
    out = exported["out"]
    assert out == os.path.join(exported["root"], R.EXPORTS_DIR, "few")
    assert os.path.exists(os.path.join(out, S.EXPORT_MANIFEST))


def test_after_an_export_nothing_the_app_started_listens_on_every_interface(exported):
    wide = [(a, p) for a, p in listening_sockets() if a in ("0.0.0.0", "::")]
    assert wide == []
