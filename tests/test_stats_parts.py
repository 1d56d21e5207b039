"""Stats on a Dask cluster, one task per part, give the catalog's figures exactly; a collection
with unfinished parts is refused in one line naming them and what to run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench.synthetic import write_vector_collection
from collection import schema as S
from curation.stats import stats

REPO = Path(__file__).resolve().parent.parent


def _collection(root: Path) -> str:
    coll = write_vector_collection(str(root), 900, 3, dim=8)
    path = root / "metadata" / "metadata_1.parquet"
    t = pq.read_table(path)  # failure messages that differ by part, so the merge has work to do
    i = t.schema.get_field_index(S.ERROR)
    errors = [
        None if e is None else f"bad {k[-1]}"
        for e, k in zip(t[S.ERROR].to_pylist(), t[S.KEY].to_pylist())
    ]
    pq.write_table(t.set_column(i, S.ERROR, pa.array(errors, pa.string())), path)
    return coll


def test_one_task_per_part_gives_the_catalogs_figures(tmp_path):
    coll = _collection(tmp_path / "c")
    for where in (None, "clip_similarity > 0.3"):
        local = stats(coll, bins=12, where=where)
        spread = stats(coll, bins=12, where=where, workers=2)
        assert spread == local
    assert sum(r["n"] for r in local["status"]) == 900
    assert len(local["failures"]) > 2 and all(h["counts"] for h in local["histograms"])


def test_unfinished_parts_are_named_with_what_to_run(tmp_path):
    coll = Path(_collection(tmp_path / "c"))
    (coll / "_done" / "2.json").unlink()
    got = subprocess.run(
        [sys.executable, "-m", "curation.stats", str(coll), "--workers", "1"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = got.stderr.strip().splitlines()
    assert got.returncode == 2 and len(lines) == 1, got.stderr
    assert "part(s) 2 have metadata but no _done marker" in lines[0]
    assert "python -m pipelines.embed" in lines[0]


def test_tasks_read_a_bucket_as_they_read_a_folder(tmp_path, s3_server, s3_bucket):
    local = _collection(tmp_path / "c")
    remote = f"{s3_bucket}/c"
    s3_server.filesystem().put(local, remote.removeprefix("s3://"), recursive=True)
    got, want = stats(remote, bins=8, workers=1), stats(local, bins=8)
    assert got.pop("collection") == remote and want.pop("collection") == local
    assert got == want
