"""The copies level's candidate sources stay bounded per row however many rows look alike: a
crowd of near-identical hashes gives at most the bound per row, and a true copy in the crowd
is still a candidate."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation import copy_candidates as C

N = 400
COPY = (17, N - 1)  # the true copy: one bit from its original


def _crowd(rng: np.random.Generator) -> np.ndarray:
    """N hashes a few bits from one another (every band value shared by many of them), the
    last a one-bit copy of row 17."""
    base = rng.integers(0, 2**63, dtype=np.int64).astype(np.uint64)
    out = np.full(N, base, np.uint64)
    for i in range(N - 1):
        for bit in rng.choice(64, 3, replace=False):
            out[i] ^= np.uint64(1) << np.uint64(int(bit))
    out[N - 1] = out[COPY[0]] ^ np.uint64(1 << 40)
    return out


def _band_candidates(tmp_path, hashes: np.ndarray, **bound: int) -> set[tuple[int, int]]:
    rows = str(tmp_path / "rows.parquet")
    pq.write_table(
        pa.table({"id": np.arange(N, dtype=np.int64), "alive": np.ones(N, bool), "phash": hashes}),
        rows,
    )
    found: set[tuple[int, int]] = set()
    for b, (shift, width) in enumerate(C.bands()):
        out = str(tmp_path / f"band-{b}.parquet")
        count = C.band_pairs(rows, out, shift, width, C.PHASH_MAX_DISTANCE, **bound)
        table = pq.read_table(out)
        assert table.num_rows == count
        pairs = list(zip(table["i"].to_pylist(), table["j"].to_pylist()))
        assert all(i < j for i, j in pairs) and len(set(pairs)) == len(pairs)
        if "per_row" in bound:
            assert count <= bound["per_row"] * N  # each kept pair is one row's choice
        found |= set(pairs)
    return found


def test_a_crowd_of_close_hashes_gives_at_most_the_bound_per_row(tmp_path):
    hashes = _crowd(np.random.default_rng(0))
    every = _band_candidates(tmp_path, hashes)
    assert len(every) > 20 * N  # unbounded, the crowd is a quadratic join
    per_row = 4
    bounded = _band_candidates(tmp_path, hashes, per_row=per_row)
    assert len(bounded) <= per_row * N * len(C.bands())
    assert bounded <= every and COPY in bounded
    # each row keeps its nearest: the copy's partner at one bit comes first
    degree = np.bincount(np.array(sorted(bounded)).ravel(), minlength=N)
    assert degree.min() >= per_row


def test_over_shared_band_values_are_left_to_the_other_bands(tmp_path):
    rng = np.random.default_rng(1)
    hashes = _crowd(rng)
    hashes[: N // 2] = rng.integers(0, 2**63, N // 2, dtype=np.int64).astype(np.uint64)
    hashes[N - 1] = hashes[COPY[0]] ^ np.uint64(1 << 40)  # a copy outside the crowd
    found = _band_candidates(tmp_path, hashes, max_shared=8)
    assert COPY in found  # its values are rare: no band of it is skipped
    every = _band_candidates(tmp_path, hashes)
    assert found <= every and len(found) < len(every) // 10  # the crowd's shared values


def test_local_hashes_keep_the_partners_sharing_most(tmp_path):
    # 0 and 1 share hashes 10 and 12; all of 0..9 share 20; 2..9 share 30 as well
    pictures = {0: [10, 12, 20], 1: [10, 12, 20], **{p: [20, 30] for p in range(2, 10)}}
    ids = [p for p, hs in pictures.items() for _ in hs]
    sketch = str(tmp_path / "sketch.parquet")
    pq.write_table(pa.table({"id": ids, "h": [h for hs in pictures.values() for h in hs]}), sketch)
    out = str(tmp_path / "local.parquet")

    def pairs() -> set[tuple[int, int]]:
        table = pq.read_table(out)
        return set(zip(table["i"].to_pylist(), table["j"].to_pylist()))

    assert C.local_pairs([sketch], out, 0, 1, 10) == 45  # unbounded: every pair of the ten
    assert len(pairs()) == 45
    assert C.local_pairs([sketch], out, 0, 1, 10, per_row=1) == 8
    # each picture's partner sharing the most hashes (ties: the lowest id)
    assert pairs() == {(0, 1)} | {(2, j) for j in range(3, 10)}
