"""Reading Streamlit AppTest pages the way the benchmarks and tests both need: the rows of the
result grids (`webui.grid`, a v2 component AppTest shows as its JSON payload)."""

from __future__ import annotations

import json
from typing import Any


def grids(at: Any) -> list:
    """The result grids on the page (`webui.grid`: v2 components), in page order."""
    return list(at.get("bidi_component"))


def cards(at: Any) -> list[dict]:
    """Every grid's cards, in page and grid order (thumbnail, caption, line, weak flag, row)."""
    return [c for g in grids(at) for c in json.loads(g.proto.json).get("items", [])]


def results(at: Any) -> list[dict]:
    """The result rows on the page, in grid order (each card carries its row for the lightbox)."""
    return [c["details"] for c in cards(at)]
