"""The copies level at scale: the banded phash index finds every pair within its distance; the
verdict tasks give the same output on a Dask cluster as in this process; a killed run rerun
redoes only its unfinished tasks and gives the same output."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from collection import schema as S
from collection.cluster import open_cluster
from curation import copy_candidates as C, dedup_stages
from curation.dedup import COPIES_WORK, dedup


def _hashes(rng: np.random.Generator, n: int, max_distance: int) -> np.ndarray:
    """n 64-bit hashes, many of them a few bits from another (up to max_distance + 2)."""
    out = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    out |= rng.integers(0, 2, n).astype(np.uint64)
    for i in range(n // 2, n):
        flips = rng.choice(64, int(rng.integers(0, max_distance + 3)), replace=False)
        out[i] = out[rng.integers(0, n // 2)]
        for bit in flips:
            out[i] ^= np.uint64(1) << np.uint64(int(bit))
    return out


@pytest.mark.parametrize("max_distance", [0, 3, C.PHASH_MAX_DISTANCE, 12])
def test_banded_index_finds_every_pair_within_the_distance(tmp_path, max_distance):
    rng = np.random.default_rng(max_distance)
    n = 300
    hashes = _hashes(rng, n, max_distance)
    alive = rng.random(n) > 0.1
    rows = str(tmp_path / "rows.parquet")
    pq.write_table(
        pa.table({"id": np.arange(n, dtype=np.int64), "alive": alive, "phash": hashes}), rows
    )
    found = set()
    for b, (shift, width) in enumerate(C.bands(max_distance)):
        out = str(tmp_path / f"band-{b}.parquet")
        count = C.band_pairs(rows, out, shift, width, max_distance)
        table = pq.read_table(out)
        assert table.num_rows == count
        found |= set(zip(table["i"].to_pylist(), table["j"].to_pylist()))
    expected = {
        (i, j)
        for i, j in itertools.combinations(range(n), 2)
        if alive[i] and alive[j] and bin(int(hashes[i] ^ hashes[j])).count("1") <= max_distance
    }
    assert len(expected) > n // 10  # the hashes do have many close pairs
    assert found == expected


def test_bands_cover_the_64_bits_and_refuse_impossible_distances():
    for d in range(64):
        spans = C.bands(d)
        assert len(spans) == d + 1 and sum(w for _, w in spans) == 64
        assert [s for s, _ in spans] == list(np.cumsum([0] + [w for _, w in spans[:-1]]))
    with pytest.raises(ValueError, match="0..63"):
        C.bands(64)


def _table(coll: str, run: str) -> pa.Table:
    return pq.read_table(S.InsightLayout(coll).duplicates(run))


@pytest.fixture(scope="module", autouse=True)
def few_neighbours():
    """Fewer pixel checks per sample: the driver passes the candidate settings to the tasks."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C, "COPY_NEIGHBOURS", 4)
        yield


@pytest.fixture(scope="module")
def local_run(insight_collection) -> pa.Table:
    coll = insight_collection["collection"]
    report = dedup(coll, S.LEVEL_COPIES, workers=0, run="pairs-local")
    assert report["copies"]["verified_pairs"] > 0 and report["removed"] > 0
    return _table(coll, "pairs-local")


def test_a_dask_cluster_gives_the_local_output(insight_collection, local_run):
    coll = insight_collection["collection"]
    with open_cluster(workers=2) as cluster:
        address = cluster.client.scheduler.address
        assert address.startswith("tcp://127.0.0.1:")
        report = dedup(coll, S.LEVEL_COPIES, scheduler=address, run="pairs-dask")
    assert _table(coll, "pairs-dask").equals(local_run)
    # the verdicts come back as counts; the pictures stay in the tasks
    assert report["copies"]["pictures_read"] > 0


def test_a_killed_run_reruns_only_unfinished_tasks_and_gives_the_same_output(
    insight_collection, local_run, monkeypatch
):
    coll = insight_collection["collection"]
    monkeypatch.setattr(C, "PAIRS_PER_TASK", 100)  # several verdict tasks
    calls: list[str] = []
    real = dedup_stages.check_pairs

    def killed_after_two(work, task):
        if len(calls) == 2:
            raise KeyboardInterrupt  # what Ctrl-C or a killed process leaves behind
        calls.append(f"verdict-{task}")
        return real(work, task)

    monkeypatch.setattr(dedup_stages, "check_pairs", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        dedup(coll, S.LEVEL_COPIES, workers=0, run="pairs-killed")
    work = os.path.join(S.InsightLayout(coll).dedup_run("pairs-killed"), COPIES_WORK)
    assert len([f for f in os.listdir(work) if f.startswith("verdict-")]) == 2
    assert not os.path.exists(S.InsightLayout(coll).duplicates("pairs-killed"))

    ran: list[str] = []
    for name in ("band_pairs", "knn_pairs", "local_pairs", "plan_pairs"):
        monkeypatch.setattr(C, name, lambda *a, name=name: ran.append(name))
    monkeypatch.setattr(dedup_stages, "sketch_rows", lambda *a: ran.append("sketch_rows"))
    monkeypatch.setattr(dedup_stages, "check_pairs", lambda w, t: ran.append(t) or real(w, t))
    report = dedup(coll, S.LEVEL_COPIES, workers=0, run="pairs-killed")
    tasks = report["copies"]["verdict_tasks"]
    assert tasks > 3 and sorted(ran) == list(range(2, tasks))  # only the unfinished verdicts
    assert report["copies"]["verdict_tasks_run"] == tasks - 2
    assert _table(coll, "pairs-killed").equals(local_run)


def test_work_left_by_other_inputs_is_not_reused(insight_collection, local_run, monkeypatch):
    coll = insight_collection["collection"]
    dedup(coll, S.LEVEL_COPIES, workers=0, run="pairs-stale")
    monkeypatch.setattr(C, "COPY_MIN_COSINE", 0.999)  # far fewer embedding candidates
    report = dedup(coll, S.LEVEL_COPIES, workers=0, run="pairs-stale")
    assert report["copies"]["verdict_tasks_run"] == report["copies"]["verdict_tasks"]
    before = pq.read_table(S.InsightLayout(coll).duplicates("pairs-local"))
    assert _table(coll, "pairs-stale").num_rows <= before.num_rows
