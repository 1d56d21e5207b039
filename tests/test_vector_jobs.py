"""The vector stages as task jobs (SemDeDup alone, uniqueness, the map): the same output through a
real Dask scheduler as in-process, a killed run redoes only its unfinished tasks, the driver's
memory does not grow with the rows, and a damaged collection is named in one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from bench.synthetic import write_vector_collection
from collection import schema as S
from collection.cluster import open_cluster
from collection.parts import CollectionError
from curation import map_job, semdedup_job, uniqueness_job, uniqueness_lists
from curation.dedup import dedup
from curation.map import compute_map
from curation.semdedup import SemanticParams
from curation.uniqueness import compute_uniqueness
from curation.vector_jobs import TaskFolder
from indices.build import build

PARAMS = SemanticParams(group_size=400, leaf_size=100)
EPS = 0.2


def _collection(root: str, n: int, dim: int = 32) -> str:
    write_vector_collection(root, n, 4, dim, n_clusters=20)
    build(root, max_index_memory="100M", modality="image")
    return root


@pytest.fixture(scope="module")
def coll(tmp_path_factory) -> str:
    return _collection(str(tmp_path_factory.mktemp("vjobs") / "c"), 1600)


@pytest.fixture(scope="module")
def scheduler() -> str:
    with open_cluster(workers=2) as session:
        yield session.client.scheduler.address


def _semantic(coll: str, **kw) -> dict:
    return dedup(coll, S.LEVEL_SEMANTIC, EPS, params=PARAMS, **kw)


#: stage -> (run it, its output file, the job module and task whose failure simulates a kill)
STAGES = {
    # by lists: 2 of the 6 lists per row, 4 group tasks after the 4 assign tasks
    "uniqueness": (
        lambda c, **kw: compute_uniqueness(c, k=5, neighbour_lists=2, task_rows=400, **kw),
        lambda c: S.InsightLayout(c).uniqueness,
        (uniqueness_lists, "group_task"),
    ),
    "uniqueness_index": (
        lambda c, **kw: compute_uniqueness(c, k=5, method="index", **kw),
        lambda c: S.InsightLayout(c).uniqueness,
        (uniqueness_job, "part_task"),
    ),
    "map": (
        lambda c, **kw: compute_map(c, sample=150, clusters=3, **kw),
        lambda c: S.InsightLayout(c).map(S.MODALITY_IMAGE),
        (map_job, "part_task"),
    ),
    "semantic": (
        _semantic,
        lambda c: S.InsightLayout(c).duplicates(S.dedup_run_name(S.LEVEL_SEMANTIC, EPS)),
        (semdedup_job, "group_task"),
    ),
}


def _tasks(report: dict) -> tuple[int, int]:
    inner = report.get("semantic", report)
    return inner["tasks"], inner["tasks_run"]


@pytest.fixture(scope="module")
def local(coll) -> dict:
    """Each stage's output from an in-process run."""
    out = {}
    for name, (run, path, _) in STAGES.items():
        report = run(coll, workers=0)
        out[name] = (pq.read_table(path(coll)), report)
    return out


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_stage_through_a_dask_scheduler_writes_what_the_local_run_writes(
    coll, scheduler, local, stage
):
    run, path, _ = STAGES[stage]
    table, report = local[stage]
    assert table.num_rows > 0
    remote = run(coll, scheduler=scheduler)
    assert pq.read_table(path(coll)).equals(table)
    assert _tasks(remote) == _tasks(report) and _tasks(remote)[0] > 1
    assert not os.path.exists(path(coll).removesuffix(".parquet") + "_tasks")  # joined, removed


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_killed_run_rerun_redoes_only_its_unfinished_tasks(coll, local, monkeypatch, stage):
    run, path, (module, task) = STAGES[stage]
    real = getattr(module, task)
    ran = []

    def killed(folder, name, *args):
        if len(ran) == 1:
            raise RuntimeError("killed")
        ran.append(name)
        return real(folder, name, *args)

    os.remove(path(coll))
    monkeypatch.setattr(module, task, killed)
    with pytest.raises(RuntimeError, match="killed"):
        run(coll, workers=0)
    assert not os.path.exists(path(coll))
    monkeypatch.setattr(module, task, real)
    again = run(coll, workers=0)
    total, redone = _tasks(again)
    # the kill left one task of its kind finished (and, for semantic and uniqueness by lists,
    # every part assigned)
    assert redone == total - 1 - (4 if stage in ("semantic", "uniqueness") else 0)
    assert pq.read_table(path(coll)).equals(local[stage][0])


@pytest.mark.parametrize("stage", list(STAGES))
def test_lost_task_outputs_are_redone_on_dask_and_the_output_is_identical(
    coll, scheduler, local, monkeypatch, stage
):
    run, path, _ = STAGES[stage]
    monkeypatch.setattr(TaskFolder, "remove", lambda self: None)  # keep the task folder
    run(coll, scheduler=scheduler)
    folder = path(coll).removesuffix(".parquet") + "_tasks"
    markers = sorted(f for f in os.listdir(folder) if f.endswith(".done.json"))
    lost = [m for m in markers if m.startswith(("part_", "assign_", "group_"))][::2]
    for m in lost:
        os.remove(os.path.join(folder, m))
        os.remove(os.path.join(folder, m.removesuffix(".done.json") + ".parquet"))
    os.remove(path(coll))
    report = run(coll, scheduler=scheduler)
    assert _tasks(report)[1] == len(lost)
    assert pq.read_table(path(coll)).equals(local[stage][0])
    shutil.rmtree(folder)


def test_changed_parameters_redo_every_task(coll, local):
    report = compute_uniqueness(coll, k=3, neighbour_lists=2, task_rows=400, workers=0)
    assert _tasks(report)[1] == _tasks(report)[0]
    assert not pq.read_table(S.InsightLayout(coll).uniqueness).equals(local["uniqueness"][0])


#: one stage in a fresh interpreter; prints the driver's peak RSS and peak anonymous RSS (KiB):
#: the second leaves out file pages (memory-mapped embeddings), which the kernel can drop
DRIVER = """
import json, resource, sys, threading, time
from curation.dedup import dedup
from curation.map import compute_map
from curation.semdedup import SemanticParams
from curation.uniqueness import compute_uniqueness
peak = [0]
def watch():
    while True:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    peak[0] = max(peak[0], int(line.split()[1]))
        time.sleep(0.01)
threading.Thread(target=watch, daemon=True).start()
stage, coll, scheduler = sys.argv[1:]
if stage == "uniqueness":
    compute_uniqueness(coll, scheduler=scheduler)
elif stage == "map":
    compute_map(coll, sample=300, clusters=4, scheduler=scheduler)
else:
    dedup(coll, "semantic", 0.1, scheduler=scheduler, params=SemanticParams(group_size=2000))
time.sleep(0.05)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rss": rss, "anon": peak[0]}))
"""


def test_the_drivers_memory_does_not_grow_with_the_rows(tmp_path, scheduler):
    n = 6000
    roots = [_collection(str(tmp_path / str(rows)), rows, 128) for rows in (n, 4 * n)]
    for stage in ("uniqueness", "map", "semantic"):
        peaks = []
        for root in roots:
            out = subprocess.run(
                [sys.executable, "-c", DRIVER, stage, root, scheduler],
                capture_output=True,
                text=True,
                check=True,
            )
            peaks.append(json.loads(out.stdout.strip().splitlines()[-1]))
        # 4x the rows (each part 4x longer): a driver holding anything per row would show it
        assert peaks[1]["rss"] / peaks[0]["rss"] < 1.3, (stage, peaks)
        assert peaks[1]["anon"] / peaks[0]["anon"] < 1.3, (stage, peaks)


def test_a_damaged_collection_is_named_with_what_to_run(tmp_path):
    root = _collection(str(tmp_path / "c"), 400)
    layout = S.CollectionLayout(root)
    os.remove(layout.img_emb(2))
    for run in (
        lambda: compute_uniqueness(root, workers=0),
        lambda: compute_map(root, sample=50, workers=0),
        lambda: _semantic(root, workers=0),
    ):
        with pytest.raises(
            CollectionError, match=r"img_emb_2\.npy: missing image .*pipelines\.embed"
        ):
            run()
    os.remove(layout.metadata(1))
    with pytest.raises(CollectionError, match=r"metadata_1\.parquet: missing metadata of part 1"):
        compute_uniqueness(root, workers=0)
    other = _collection(str(tmp_path / "other"), 400)
    shutil.rmtree(S.CollectionLayout(other).indices_dir)
    with pytest.raises(CollectionError, match="no image index.*indices.build"):
        compute_uniqueness(other, workers=0, method="index")
    # by lists, a collection without an index is grouped by a k-means on a sample
    assert compute_uniqueness(other, workers=0)["centroids"] == "kmeans"


def test_semantic_alone_numbers_groups_by_their_kept_sample(local):
    table = local["semantic"][0].to_pandas()
    kept = table[table[S.DUP_KEPT]]
    assert kept[S.DUP_GROUP].tolist() == list(range(len(kept)))  # id order = group order
    assert (table.groupby(S.DUP_GROUP)[S.DUP_KEPT].sum() == 1).all()
    assert np.isfinite(table[S.DUP_SIMILARITY]).all()
