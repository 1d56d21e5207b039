"""docs/scale.md: its tables are the ones bench/results says, it keeps the section the indices
benchmark writes, and the README links it."""

from __future__ import annotations

import json
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


def test_the_driver_is_projected_from_its_anonymous_memory_where_recorded(tmp_path):
    # RSS grows by the mapped embeddings (page cache); the anonymous part stays flat
    entry = {"seconds": 2.0, "cpu_seconds": 2.0}
    doc = {
        "1m": {
            "concept": {
                **entry,
                "rows": 10**6,
                "driver_peak_rss_mb": 2000.0,
                "driver_peak_anon_mb": 1200.0,
            }
        },
        "10m": {
            "concept": {
                **entry,
                "rows": 10**7,
                "driver_peak_rss_mb": 11000.0,
                "driver_peak_anon_mb": 1300.0,
            }
        },
    }
    (tmp_path / "scale.json").write_text(json.dumps(doc))
    concept = next(
        line for line in scale_doc.projection(tmp_path).splitlines() if line.startswith("| concept")
    )
    assert "flat: 1.3 GB anonymous" in concept
    for d in doc.values():  # without the anonymous peak the RSS slope is all there is
        del d["concept"]["driver_peak_anon_mb"]
    (tmp_path / "scale.json").write_text(json.dumps(doc))
    concept = next(
        line for line in scale_doc.projection(tmp_path).splitlines() if line.startswith("| concept")
    )
    assert "grows 1,000 MB per 1M rows" in concept and "anonymous" not in concept
