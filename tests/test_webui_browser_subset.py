"""The Subset page in a real browser (Debian's chromium through Playwright, as
`tests/test_webui_browser.py`): a clause that does not run is refused when added and nothing is
saved, and the draft's clauses and name survive a reload of the page (they are kept in the
collection's subsets/drafts/)."""

from __future__ import annotations

import os
import shutil

import pytest

from bench.browser import browser_page, missing, streamlit_server
from collection import schema as S
from curation.catalog import Catalog
from webui.draft import draft_path

MISSING = missing()
if MISSING and os.environ.get("CI"):
    pytest.fail(f"the browser test must run in CI: {MISSING}", pytrace=False)
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


@pytest.fixture(scope="module")
def served(demo_collection, tmp_path_factory):
    """A copy of the demo collection (this test writes drafts and subsets) behind
    `streamlit run webui/app.py` on a free port of 127.0.0.1, and a chromium page on it."""
    root = tmp_path_factory.mktemp("browser-subset")
    coll = str(root / "collection")
    shutil.copytree(demo_collection["demo/collection"], coll)
    with streamlit_server(coll, root / "server.log") as server:
        with browser_page(server) as page:
            yield page, coll, server[0]


def _add_where(page, sql: str) -> None:
    box = page.get_by_label("SQL condition on `samples`")
    box.wait_for(timeout=300_000)
    box.fill(sql)
    box.press("Enter")
    page.get_by_role("button", name="Add", exact=True).click()


def test_an_invalid_clause_cannot_be_saved_and_a_draft_survives_reload(served):
    page, coll, url = served
    page.get_by_role("heading", name="Search").wait_for(timeout=300_000)
    page.get_by_role("link", name="Subset").click()
    _add_where(page, "DROP TABLE samples")
    page.locator("[data-testid=stAlert]").filter(has_text="where").first.wait_for(timeout=120_000)
    page.get_by_label("Name").fill("mine")
    page.get_by_label("Name").press("Enter")
    save = page.get_by_role("button", name="Save", exact=True)
    assert save.is_disabled()  # no clause was kept: nothing to save
    assert not os.path.exists(S.CollectionLayout(coll).subset("mine"))

    _add_where(page, "size != 'small'")
    with Catalog(coll) as cat:
        n = cat.count("size != 'small' AND id IS NOT NULL")
    page.get_by_text(f"{n:,} rows · spec hash").wait_for(timeout=120_000)
    assert os.path.exists(draft_path(coll))

    page.reload()
    page.get_by_text(f"{n:,} rows · spec hash").wait_for(timeout=120_000)
    clause = page.locator("[data-testid=stCode]").filter(has_text="size != 'small'").first
    clause.wait_for(timeout=120_000)  # code blocks are highlighted (drawn) after the counts
    name = page.get_by_label("Name")
    name.wait_for(timeout=120_000)
    assert name.input_value() == "mine"
    codes = " ".join(page.locator("[data-testid=stCode]").all_text_contents())
    assert "DROP" not in codes
