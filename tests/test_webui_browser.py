"""The web UI in a real browser: `streamlit run webui/app.py` on 127.0.0.1, driven by Playwright
through Debian's chromium (`.ci/run` installs both). Types a query, waits for the grid, checks
the captions against the search API, runs a query on the SQL page, adds a clause on the
Subset page, saves screenshots.

Skipped, with the reason, where chromium or Playwright is missing, except under CI, where that
is a failure. `SIEVE_UI_SCREENSHOTS=docs` also writes the screenshots the README shows."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from bench.browser import REPO, browser_page, missing, streamlit_server, wait_for_thumbnails
from curation.catalog import Catalog
from indices.query import query

MISSING = missing()
if MISSING and os.environ.get("CI"):
    pytest.fail(f"the browser test must run in CI: {MISSING}", pytrace=False)
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


@pytest.fixture(scope="module")
def server(demo_collection, tmp_path_factory):
    """`streamlit run webui/app.py -- --collection DEMO` on a free port, on a copy of the demo
    collection (the Subset page writes its draft there); its log kept for failures."""
    log = tmp_path_factory.mktemp("streamlit") / "server.log"
    coll = str(log.parent / "collection")
    shutil.copytree(demo_collection["demo/collection"], coll)
    with streamlit_server(coll, log) as running:
        yield running


@pytest.fixture(scope="module")
def page(server):
    with browser_page(server) as pg:
        yield pg


#: the screenshots the README shows (docs/), refreshed with SIEVE_UI_SCREENSHOTS=docs
DOCS = ("webui_search.png", "webui_subset.png")


def _shoot(page, tmp_path: Path, name: str) -> Path:
    """A screenshot in the test's folder, and in docs/ when it is one the README shows and
    SIEVE_UI_SCREENSHOTS=docs."""
    page.screenshot(path=str(tmp_path / name))
    if name in DOCS and os.environ.get("SIEVE_UI_SCREENSHOTS") == "docs":
        page.screenshot(path=str(REPO / "docs" / name))
    return tmp_path / name


def test_search_shows_the_grid_with_the_captions_search_returns(page, demo_collection, tmp_path):
    page.get_by_role("heading", name="Search").wait_for(timeout=120_000)
    box = page.get_by_role("textbox", name="Text query")
    box.fill("a red circle")
    box.press("Enter")
    page.get_by_text("20 results from the image index").wait_for(timeout=300_000)
    expected = query(
        demo_collection["demo/collection"],
        text="a red circle",
        k=20,
        safe_mode=True,
        hide_watermarked=False,
        deduplicate=True,
    )
    # the cards stream in after the count: read the page once all twenty thumbnails are drawn
    wait_for_thumbnails(page, 20)
    text = "\n".join(page.locator(".sg-line").all_inner_texts())
    captions = [r["caption"] for r in expected]
    assert [c for c in captions[:10] if c not in text] == [], text[:2000]
    assert text.index(captions[0]) < text.index(captions[5])  # in rank order
    assert _shoot(page, tmp_path, "webui_search.png").stat().st_size > 10_000


def test_sql_page_runs_a_query_and_shows_errors(page, tmp_path):
    page.get_by_role("link", name="SQL").click()
    area = page.get_by_role("textbox", name="Query")
    area.wait_for(timeout=60_000)
    area.fill(
        "SELECT status, count(*) AS n, round(avg(clip_similarity), 3) AS mean_similarity "
        "FROM samples GROUP BY status ORDER BY n DESC"
    )
    page.get_by_role("button", name="Run").click()
    page.get_by_text("2 rows in").wait_for(timeout=120_000)
    page.locator("[data-testid=stDataFrame]").wait_for(timeout=60_000)
    page.wait_for_timeout(1500)  # the grid is drawn on a canvas after it is attached
    _shoot(page, tmp_path, "webui_sql.png")
    area.fill("SELEC status FROM samples")
    page.get_by_role("button", name="Run").click()
    alert = page.locator("[data-testid=stAlert]").filter(has_text="syntax")
    alert.wait_for(timeout=60_000)
    assert "syntax" in alert.inner_text().lower()


def test_subset_page_counts_a_clause_and_shows_a_sample(page, demo_collection, tmp_path):
    page.get_by_role("link", name="Subset").click()
    box = page.get_by_label("SQL condition on `samples`")
    box.wait_for(timeout=60_000)
    box.fill("size != 'small'")
    box.press("Enter")
    page.get_by_role("button", name="Add", exact=True).click()
    with Catalog(demo_collection["demo/collection"]) as cat:
        n = cat.count("size != 'small' AND id IS NOT NULL")
    page.get_by_text(f"{n:,} rows · spec hash").wait_for(timeout=120_000)
    wait_for_thumbnails(page, 10)
    page.wait_for_timeout(1500)  # the counts table is drawn on a canvas after it is attached
    assert _shoot(page, tmp_path, "webui_subset.png").stat().st_size > 10_000
