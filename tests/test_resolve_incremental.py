"""Incremental resolution: a clause added after the resolved ones starts from the cached rows of
the longest resolved prefix of steps, and gives exactly what a full resolve gives."""

from __future__ import annotations

import numpy as np
import pytest

from collection import schema as S
from curation.resolve import Step, StepCache, resolve
from tests.test_subset import StubClip, coll  # noqa: F401 - the module's collection fixture

SPECS = [
    {"where": ["width >= 48"]},
    {"where": ["width >= 48", f"{S.CLIP_SIMILARITY} < 0.3"]},
    {"where": ["width >= 48", f"{S.CLIP_SIMILARITY} < 0.3"], "knn": [{"text": "a", "k": 50}]},
    {
        "where": ["width >= 48", f"{S.CLIP_SIMILARITY} < 0.3"],
        "knn": [{"text": "a", "k": 50}],
        "limit": 20,
    },
]


def _full(root: str, spec: dict) -> tuple[list[int], list[tuple[str, int]]]:
    res = resolve(root, {"name": "t", **spec}, encoder=StubClip())
    return res.ids.tolist(), [(s.label, s.count) for s in res.steps]


@pytest.mark.parametrize("max_bytes", [64 * 2**20, 1])
def test_each_added_clause_narrows_the_cached_rows_to_the_full_result(coll, max_bytes):  # noqa: F811
    cache = StepCache(max_bytes)
    for spec in SPECS:
        before = cache.hits
        res = resolve(coll, {"name": "t", **spec}, encoder=StubClip(), cache=cache, keys=False)
        assert (res.ids.tolist(), [(s.label, s.count) for s in res.steps]) == _full(coll, spec)
        assert res.keys == []
        if max_bytes > 1 and spec is not SPECS[0]:
            assert cache.hits == before + 1  # resumed from the previous spec's rows
    # a clause inserted before a later one (where before knn) cannot reuse the knn step
    spec = {**SPECS[3], "where": ["width >= 48", f"{S.CLIP_SIMILARITY} < 0.3", "width < 80"]}
    res = resolve(coll, {"name": "t", **spec}, encoder=StubClip(), cache=cache)
    assert res.ids.tolist() == _full(coll, spec)[0]
    assert res.keys and len(res.keys) == len(res.ids)


def test_a_new_version_of_the_collection_files_resolves_afresh(coll):  # noqa: F811
    cache = StepCache()
    resolve(coll, {"name": "t", **SPECS[0]}, cache=cache, version=1)
    hits = cache.hits
    resolve(coll, {"name": "t", **SPECS[0]}, cache=cache, version=2)
    assert cache.hits == hits
    resolve(coll, {"name": "t", **SPECS[0]}, cache=cache, version=2)
    assert cache.hits == hits + 1


def test_stored_rows_read_back_exactly_as_bitmap_or_list():
    cache = StepCache()

    for ids in (np.arange(0, 1000, 3), np.array([5, 999_999]), np.array([], np.int64)):
        cache.put("k", ids.astype(np.int64), Step("s", len(ids)), 0)
        got, step, _ = cache.get("k")
        assert got.tolist() == ids.tolist() and step.count == len(ids)
