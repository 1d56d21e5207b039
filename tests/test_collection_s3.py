"""The collection layer on an object store (moto's S3 server on loopback): listing parts,
metadata, range-read embeddings, atomic writes, and the errors a bad URL gets."""

from __future__ import annotations

import numpy as np
import pytest

from collection import schema as S
from collection.embeddings import EmbeddingStore
from collection.parts import CollectionError, complete_parts, read_metadata
from collection.storage import read_json, write_bytes, write_json
from pipelines.embed import embed
from pipelines.generate import write_sample_dataset


@pytest.fixture(scope="module")
def local_and_s3(tmp_path_factory, s3_server):
    """A 60-sample collection embedded locally, and the same embedded straight into a bucket."""
    root = tmp_path_factory.mktemp("coll")
    shards = root / "shards"
    write_sample_dataset(shards, 60, shard_size=30, corrupt_fraction=0.05)
    local = str(root / "collection")
    embed(str(shards), local, workers=1)
    remote = s3_server.make_bucket("coll-layer") + "/collection"
    embed(str(shards), remote, workers=1)
    return local, remote


def test_parts_metadata_and_embeddings_read_the_same_from_s3(local_and_s3):
    local, remote = local_and_s3
    assert complete_parts(remote) == complete_parts(local) == [0, 1]
    a, b = read_metadata(local), read_metadata(remote)
    assert a.column(S.KEY).to_pylist() == b.column(S.KEY).to_pylist()
    for modality in S.MODALITIES:
        ls, rs = EmbeddingStore.open(local, modality), EmbeddingStore.open(remote, modality)
        assert (ls.count, ls.dim) == (rs.count, rs.dim)
        ids = np.array([0, 1, 2, 7, 31, ls.count - 1])
        np.testing.assert_array_equal(ls.gather(ids), rs.gather(ids))
        for (s1, v1), (s2, v2) in zip(ls.iter_parts(), rs.iter_parts()):
            assert s1 == s2
            np.testing.assert_array_equal(v1, v2)


def test_atomic_writes_leave_no_temporary_on_s3(s3_bucket, s3_server):
    url = f"{s3_bucket}/x/doc.json"
    write_json(url, {"a": 1})
    write_bytes(f"{s3_bucket}/x/blob", b"abc")
    assert read_json(url) == {"a": 1}
    names = sorted(p.rsplit("/", 1)[-1] for p in s3_server.filesystem().ls(f"{s3_bucket}/x"))
    assert names == ["blob", "doc.json"]


def test_bad_urls_get_one_line_errors_naming_them(s3_bucket, s3_server, local_and_s3):
    with pytest.raises(CollectionError, match="no-such-bucket"):
        complete_parts("s3://no-such-bucket-sieve/coll")
    write_bytes(f"{s3_bucket}/afile", b"x")
    with pytest.raises(CollectionError, match="afile"):
        complete_parts(f"{s3_bucket}/afile")
    # a part whose npy is missing remotely
    _, remote = local_and_s3
    fs = s3_server.filesystem()
    copy = f"{s3_bucket}/copy"
    fs.copy(remote.removeprefix("s3://"), copy.removeprefix("s3://"), recursive=True)
    fs.rm(S.CollectionLayout(copy).img_emb(1).removeprefix("s3://"))
    with pytest.raises(CollectionError, match="img_emb_1.npy"):
        EmbeddingStore.open(copy, S.MODALITY_IMAGE)


def test_remote_rows_come_back_in_the_order_asked_whatever_the_gaps(s3_bucket):
    from collection.embeddings import MERGE_GAP, RemoteNpy
    from pipelines.embed_writer import npy_bytes

    rng = np.random.default_rng(0)
    arr = rng.standard_normal((4 * MERGE_GAP // 128, 64)).astype(np.float16)  # 128-byte rows
    write_bytes(f"{s3_bucket}/a.npy", npy_bytes(arr))
    remote = RemoteNpy(f"{s3_bucket}/a.npy")
    for rows in (
        rng.integers(0, len(arr), 300),  # any order, repeats
        np.sort(rng.choice(len(arr), 50, replace=False)),
        np.array([len(arr) - 1, 0, 0, MERGE_GAP // 128 + 5]),  # far apart: separate requests
    ):
        np.testing.assert_array_equal(remote[rows], arr[rows])
