"""Export at scale: the same bytes on a Dask cluster of processes as on one in-process worker,
a driver whose peak memory does not grow with the rows exported, and a one-line refusal of a
collection with unfinished parts. (Kill and rerun: tests/test_export.py.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.scale_probe import watch
from bench.synthetic import write_vector_collection
from collection import schema as S
from collection.cluster import open_cluster
from curation.context import Context
from curation.export import export
from curation.resolve import resolve

REPO = Path(__file__).resolve().parent.parent
#: a wide source column (as LAION's json fields can be): what a driver holding rows would hold
BLOB = 4096


def _collection(root: Path, n: int, parts: int) -> str:
    blobs = [f"{i:04d}" + "x" * (BLOB - 4) for i in range(500)]
    sources = pa.table({"src_blob": pa.array(blobs)})
    return write_vector_collection(str(root), n, parts, dim=8, sources=sources)


def _spec(tmp: Path) -> str:
    spec = tmp / "all.yaml"
    spec.write_text("name: all\nwhere: 'true'\n")
    return str(spec)


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.parquet"))}


def _cli(coll: str, spec: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "curation.export", coll, spec, "--out", str(out), *extra],
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_cluster_of_processes_writes_what_one_in_process_worker_writes(tmp_path):
    coll = _collection(tmp_path / "coll", 3000, 4)
    spec = _spec(tmp_path)
    got = _cli(coll, spec, tmp_path / "dask", "--format", "urls", "--workers", "2")
    got.check_returncode()
    with open_cluster(workers=1, processes=False) as cluster:
        local = export(
            coll, spec, str(tmp_path / "local"), format=S.EXPORT_URLS, client=cluster.client
        )
    dask_files = _files(tmp_path / "dask")
    assert len(dask_files) == 1 and dask_files == _files(tmp_path / "local")
    manifest = json.loads((tmp_path / "dask" / S.EXPORT_MANIFEST).read_text())
    assert manifest[S.MANIFEST_COUNT] == local[S.MANIFEST_COUNT] > 2500
    assert "src_blob" in manifest[S.MANIFEST_COLUMNS]


def test_the_rows_of_a_shard_share_one_schema_whatever_parts_they_come_from(tmp_path):
    coll = _collection(tmp_path / "coll", 400, 2)
    spec = _spec(tmp_path)
    export(coll, spec, str(tmp_path / "out"), shard_size=150, format=S.EXPORT_URLS)
    schemas = {tuple(pq.read_schema(p).names) for p in (tmp_path / "out").glob("*.parquet")}
    assert len(list((tmp_path / "out").glob("*.parquet"))) == 3 and len(schemas) == 1


@pytest.mark.parametrize("n", [12_000])
def test_driver_peak_memory_does_not_grow_with_the_rows_exported(tmp_path, n):
    """The same export of N and 4N rows (4 KB of metadata each): a driver holding the rows would
    hold 4N x 4 KB more at 4N; this one holds their ids. Peaks come from /proc (VmHWM)."""
    spec = _spec(tmp_path)
    peaks = {}
    for rows in (n, 4 * n):
        coll = _collection(tmp_path / f"c{rows}", rows, 4)
        cmd = [sys.executable, "-m", "curation.export", coll, spec, "--out"]
        cmd += [str(tmp_path / f"out{rows}"), "--format", "urls", "--workers", "1"]
        got = watch(cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=str(REPO))
        assert got.rc == 0, got.tail
        assert got.worker_peak_rss_mb > 0  # the rows went through a worker process
        peaks[rows] = got.driver_peak_rss_mb
    growth_mb = peaks[4 * n] - peaks[n]
    held_mb = 3 * n * BLOB / 2**20  # what holding the extra rows once would cost
    assert peaks[4 * n] / peaks[n] < 1.1, peaks
    assert growth_mb < held_mb / 3, (peaks, held_mb)


def test_unfinished_parts_are_named_with_what_to_run(tmp_path):
    coll = Path(_collection(tmp_path / "coll", 300, 3))
    (coll / "_done" / "1.json").unlink()  # part 1 written, its marker not: an embed cut short
    got = _cli(str(coll), _spec(tmp_path), tmp_path / "out", "--format", "urls")
    lines = got.stderr.strip().splitlines()
    assert got.returncode == 1 and len(lines) == 1
    assert "part(s) 1 have metadata but no _done marker" in lines[0]
    assert "python -m pipelines.embed" in lines[0]
    shutil.rmtree(coll / "metadata")
    (coll / "metadata").mkdir()  # nothing left but markers: collection.json still counts 3
    got = _cli(str(coll), _spec(tmp_path), tmp_path / "out", "--format", "urls")
    assert got.returncode == 1 and "where collection.json counts 3" in got.stderr


def test_the_export_never_reads_the_resolved_keys(tmp_path, monkeypatch):
    # the driver holds 8 bytes a resolved row: the keys as Python strings would be ~10x that
    coll = _collection(tmp_path / "coll", 600, 2)

    def no_keys(self, ids):
        raise AssertionError("the export asked for the resolved keys")

    monkeypatch.setattr(Context, "keys", no_keys)
    manifest = export(coll, _spec(tmp_path), str(tmp_path / "out"), format="urls", workers=0)
    rows = sum(pq.read_metadata(p).num_rows for p in (tmp_path / "out").glob("*.parquet"))
    wanted = len(resolve(coll, _spec(tmp_path), keys=False).ids)
    assert rows == wanted > 500 and manifest[S.MANIFEST_FORMAT] == "urls"
