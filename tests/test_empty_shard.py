"""An empty shard (img2dataset's output when every download failed) is a part of 0 samples,
and every reader of the collection copes with that part between two full ones."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from collection import schema as S
from collection.embeddings import EmbeddingStore
from curation.catalog import Catalog
from curation.sql import sql
from indices.build import build
from indices.search import Searcher
from tests.test_shards import sample_members, write_tar
from tests.test_tar_reader import tar_bytes

ROOT = Path(__file__).resolve().parent.parent
N = 6  # samples in each full shard
EMPTY = 1  # the part number of the empty shard, between two full ones


@pytest.fixture(scope="module")
def embedded(tiny_clip, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """`python -m pipelines.embed` over shards 0 (full), 1 (empty tar), 2 (full)."""
    src = tmp_path_factory.mktemp("shards")
    write_tar(src / S.shard_name(0), sample_members(N))
    (src / S.shard_name(EMPTY)).write_bytes(tar_bytes([]))
    write_tar(src / S.shard_name(2), sample_members(N, start=N))
    out = tmp_path_factory.mktemp("empty") / "collection"
    args = ["--workers", "1", "--threads-per-worker", "1", "--batch-size", "4"]
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.embed", str(src), str(out), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc, src, out


def test_embed_exits_zero_and_writes_an_empty_part(embedded):
    proc, src, out = embedded
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (summary["parts"], summary["count"], summary["ok"]) == (3, 2 * N, 2 * N)
    assert summary["failed_shards"] == {}
    layout = S.CollectionLayout(str(out))
    dim = summary["emb_dim"]
    for n, count in ((0, N), (EMPTY, 0), (2, N)):
        meta = pq.read_table(layout.metadata(n))
        assert meta.num_rows == count
        for name in S.METADATA_COLUMNS:  # the full schema, typed, even with no rows
            assert meta.schema.field(name).type == getattr(pa, S.METADATA_TYPES[name])(), name
        assert meta.column(S.STATUS).to_pylist() == [S.STATUS_OK] * count
        assert meta.column(S.EMB_ROW).to_pylist() == list(range(count))
        for modality in S.MODALITIES:
            emb = np.load(layout.emb(modality, n))
            assert (emb.shape, emb.dtype) == ((count, dim), np.dtype(S.EMB_DTYPE))
        done = json.loads(Path(layout.done(n)).read_text())
        assert (done["count"], done["ok"], done["emb_dim"]) == (count, count, dim)
        assert done["source_shard"] == str(src / S.shard_name(n))
    assert json.loads(Path(layout.done(EMPTY)).read_text())["status_counts"] == {}


def test_index_search_sql_and_embeddings_read_past_the_empty_part(embedded, tmp_path):
    """Global ids skip the empty part: id N is the first sample of part 2 everywhere."""
    out = tmp_path / "collection"
    shutil.copytree(embedded[2], out)
    root = str(out)
    built = build(root, max_index_memory="100M")
    assert sorted(built) == sorted(S.MODALITIES)
    store = EmbeddingStore.open(root)
    assert (store.parts, store.offsets.tolist(), store.count) == (
        [0, 1, 2],
        [0, N, N, 2 * N],
        2 * N,
    )
    layout = S.CollectionLayout(root)
    stacked = np.concatenate([np.load(layout.img_emb(n)) for n in store.parts]).astype(np.float32)
    assert np.array_equal(store.gather(np.arange(2 * N)), stacked)
    assert [start for start, _ in store.iter_parts()] == [0, N]

    searcher = Searcher(root)
    try:
        assert searcher.count == 2 * N
        keys = [r[S.KEY] for r in searcher.records([N - 1, N])]
        assert keys == [f"s{N - 1:05d}", f"s{N:05d}"]
        for modality in S.MODALITIES:
            hits = searcher.search_vectors(
                searcher.vector([N], modality), k=2 * N, modality=modality, deduplicate=False
            )[0]
            assert hits[0]["id"] == N and hits[0][S.KEY] == f"s{N:05d}"
            assert sorted(h["id"] for h in hits) == list(range(2 * N))
    finally:
        searcher.close()

    per_part = "SELECT part, count(*) AS n, min(id) AS lo, max(id) AS hi FROM samples GROUP BY 1"
    with Catalog(root) as catalog:
        assert catalog.count() == 2 * N
        rows = catalog.query(per_part + " ORDER BY 1").table.to_pylist()
    assert rows == [
        {"part": 0, "n": N, "lo": 0, "hi": N - 1},
        {"part": 2, "n": N, "lo": N, "hi": 2 * N - 1},
    ]
    with Catalog(root, untrusted=True) as catalog:
        assert catalog.count() == 2 * N
    result = tmp_path / "result.parquet"  # what `python -m curation.sql ... --out` writes
    assert sql(root, per_part + " ORDER BY 1", format="parquet", out=str(result))["rows"] == 2
    assert pq.read_table(result).to_pylist() == rows
