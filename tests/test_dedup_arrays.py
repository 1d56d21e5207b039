"""The duplicates table, the exact level and the subset clause computed on arrays give what the
per-sample Python versions they replace gave (kept here as the reference), on random forests
with tied similarities."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from collection import schema as S
from curation.dedup import one_per_group
from curation.dedup_stages import Links, duplicate_rows, exact_stage


def _reference_rows(parent, reason, similarity, keys) -> pa.Table:
    """The duplicates table as it was built one sample at a time."""
    root = np.where(parent >= 0, parent, np.arange(len(parent)))
    while not np.array_equal(root[root], root):
        root = root[root]
    members = np.nonzero(parent >= 0)[0]
    kept_ids = np.unique(root[members])
    group_of = {int(r): g for g, r in enumerate(kept_ids)}
    best: dict[int, tuple] = {}
    for c in members:
        cand = (float(similarity[c]), -int(c), reason[c])
        if int(parent[c]) not in best or cand > best[int(parent[c])]:
            best[int(parent[c])] = cand
    rows = []
    for i in np.sort(np.concatenate([members, kept_ids])):
        i = int(i)
        if parent[i] >= 0:
            rows.append(
                (keys[i], group_of[int(root[i])], False, reason[i], keys[parent[i]], similarity[i])
            )
        else:
            sim, child, why = best[i]
            rows.append((keys[i], group_of[i], True, why, keys[-child], sim))
    cols = list(zip(*rows)) if rows else [[]] * 6
    types = (pa.string(), pa.int64(), pa.bool_(), pa.string(), pa.string(), pa.float32())
    names = (S.DUP_KEY, S.DUP_GROUP, S.DUP_KEPT, S.DUP_REASON, S.DUP_NEAREST, S.DUP_SIMILARITY)
    return pa.table({n: pa.array(c, t) for n, c, t in zip(names, cols, types)})


def _random_forest(rng: np.random.Generator, n: int) -> Links:
    """Chains and stars of links in random order, with similarities rounded so ties happen."""
    links = Links(n)
    placed: list[int] = []
    for i in rng.permutation(n):
        if placed and rng.random() < 0.6:
            reason = S.DUP_REASONS[rng.integers(len(S.DUP_REASONS))]
            sim = np.float32(round(float(rng.uniform(0.5, 1.0)), 1))
            links.link(np.array([i]), np.array([placed[rng.integers(len(placed))]]), reason, sim)
        placed.append(int(i))
    return links


@pytest.mark.parametrize("seed", range(6))
def test_the_duplicates_table_equals_the_per_sample_reference(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    links = _random_forest(rng, n)
    keys = np.array([f"k{i:04d}" for i in rng.permutation(n)], dtype=object)
    reasons = np.array([S.DUP_REASONS[r] if r >= 0 else None for r in links.reason], object)
    got = duplicate_rows(links, pa.array(keys.tolist()))
    assert got.equals(_reference_rows(links.parent, reasons, links.similarity, keys))
    assert links.count(S.REASON_COPY) == int(np.sum(reasons == S.REASON_COPY))


def test_no_duplicates_make_an_empty_table_with_the_columns():
    table = duplicate_rows(Links(3), pa.array(["a", "b", "c"]))
    assert table.num_rows == 0 and table.equals(_reference_rows(np.full(3, -1), [], [], []))


class _Store:
    def __init__(self, vectors: np.ndarray) -> None:
        self.vectors = vectors

    def gather(self, ids: np.ndarray) -> np.ndarray:
        return self.vectors[ids]


def test_the_exact_level_links_each_sha256_to_its_best_ranked_sample():
    rng = np.random.default_rng(3)
    n = 400
    sha = [
        None if r < 0.05 else "" if r < 0.1 else f"h{h}"
        for r, h in zip(rng.random(n), rng.integers(0, 120, n))
    ]
    ranks = rng.permutation(n)
    vectors = rng.standard_normal((n, 8)).astype(np.float32)
    links = Links(n)
    removed = exact_stage(pa.table({S.SHA256: sha}), ranks, links, _Store(vectors))
    groups: dict[str, list[int]] = {}
    for i, h in enumerate(sha):
        if h:
            groups.setdefault(h, []).append(i)
    want = np.full(n, -1)
    for members in groups.values():
        best = min(members, key=lambda i: ranks[i])
        want[[m for m in members if m != best]] = best
    assert removed == int((want >= 0).sum()) > 0
    assert np.array_equal(links.parent, want)
    gone = want >= 0
    sims = np.einsum("nd,nd->n", vectors[gone], vectors[want[gone]])
    assert np.allclose(links.similarity[gone], sims) and links.count(S.REASON_EXACT) == gone.sum()


@pytest.mark.parametrize("seed", range(6))
def test_the_subset_clause_keeps_the_kept_or_earliest_present_member(seed):
    rng = np.random.default_rng(seed)
    n = 500
    gids = rng.choice(n, size=200, replace=False)
    groups = rng.integers(0, 40, size=200)
    kept = np.zeros(200, bool)
    kept[np.unique(groups, return_index=True)[1]] = True
    ids = np.sort(rng.choice(n, size=int(rng.integers(1, n)), replace=False)).astype(np.int64)
    # the reference: one sample at a time
    order = np.lexsort((gids, ~kept, groups))
    drop, seen = [], set()
    for row in order:
        if gids[row] in set(ids.tolist()):
            if groups[row] in seen:
                drop.append(gids[row])
            else:
                seen.add(groups[row])
    want = ids[~np.isin(ids, np.array(drop, np.int64))]
    assert np.array_equal(one_per_group(ids, gids, groups, kept), want)
    assert len(want) < len(ids) or not drop
