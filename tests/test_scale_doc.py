"""docs/scale.md: its tables are the ones bench/results says, it keeps the section the indices
benchmark writes, and the README links it."""

from __future__ import annotations

from pathlib import Path

from bench import scale_doc

REPO = Path(__file__).resolve().parent.parent


def test_the_scale_tables_are_the_measured_ones():
    text = scale_doc.DOC.read_text()
    assert scale_doc.render_doc(text) == text


def test_the_page_keeps_the_index_section_and_the_readme_links_it():
    text = scale_doc.DOC.read_text()
    assert "\n## Index build and serve\n" in text
    assert "docs/scale.md" in (REPO / "README.md").read_text()


def test_a_size_without_figures_says_so(tmp_path):
    (tmp_path / "scale.json").write_text('{"1m": {"sql": {"rows": 1000000, "seconds": 2.0}}}')
    block = scale_doc.measured(tmp_path)
    sql = next(line for line in block.splitlines() if line.startswith("| SQL"))
    assert "2.0 s" in sql and sql.count("not measured") >= 2
    assert "1m only, wall × 2 (upper bound)" in scale_doc.projection(tmp_path)
