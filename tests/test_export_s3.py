"""Export and what reads images back, on an object store (moto's S3 server on loopback): exports
s3→s3, s3→local and local→s3 write the same shards as a local export, source shards are read by
byte range (bytes fetched within 1.2× the members' bytes), a tampered member is reported and left
out, a rerun writes only missing shards, thumbnails and the copy check's pictures come from s3
shards, and training reads an s3 export. Also `collection.images` itself, on local files."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from bench.synthetic import collection_from_shards
from collection import images as I, schema as S
from collection.parts import read_metadata
from collection.storage import TMP_MARK, read_json, url_to_fs
from curation.export_job import run_export
from curation.export_shard import ExportError
from curation.resolve import Resolution, resolve
from pipelines.generate import write_sample_dataset

REPO = Path(__file__).resolve().parent.parent
SPEC = {"name": "big", "where": "size != 'small'"}


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0"
    )
    with Client(cluster) as c:
        yield c
    cluster.close()


@pytest.fixture(scope="module")
def made(tmp_path_factory, s3_server) -> dict[str, str]:
    """120 generated samples in two shards, on disk and copied into a bucket; a collection over
    each copy (the same vectors: `collection_from_shards` seeds them by part)."""
    root = tmp_path_factory.mktemp("export-s3")
    write_sample_dataset(root / "shards", 120, size=32, corrupt_fraction=0.05, shard_size=60)
    bucket = s3_server.make_bucket("export-s3")
    fs = s3_server.filesystem()
    fs.put(str(root / "shards"), f"{bucket.removeprefix('s3://')}/shards", recursive=True)
    local = collection_from_shards(str(root / "shards"), str(root / "coll"), dim=16)
    remote = collection_from_shards(f"{bucket}/shards", f"{bucket}/coll", dim=16)
    return {"root": str(root), "bucket": bucket, "local": local, "remote": remote}


def remote_resolution(remote: str, spec: dict, tmp: Path) -> Resolution:
    """What `resolve(remote, spec)` gives, resolved on a downloaded copy of the collection (the
    same collection.json, so the same spec_hash): SQL on a URL is curation.catalog's, not this
    file's subject."""
    fs, path = url_to_fs(remote)
    fs.get(path, str(tmp / "mirror"), recursive=True)
    return dataclasses.replace(resolve(str(tmp / "mirror"), spec), collection=remote)


def tars(out: str) -> dict[str, bytes]:
    fs, path = url_to_fs(out)
    fs.invalidate_cache(path)
    return {
        p.rsplit("/", 1)[-1]: fs.cat_file(p)
        for p in sorted(fs.ls(path, detail=False))
        if p.endswith(".tar")
    }


def test_exports_to_and_from_s3_write_the_local_exports_shards(made, client, tmp_path):
    bucket, local, remote = made["bucket"], made["local"], made["remote"]
    base = run_export(local, SPEC, str(tmp_path / "ll"), shard_size=25, client=client)
    res = remote_resolution(remote, SPEC, tmp_path)
    assert res.keys == resolve(local, SPEC).keys
    runs = {
        "s3->s3": run_export(
            remote, SPEC, f"{bucket}/out-ss", shard_size=25, client=client, resolution=res
        ),
        "s3->local": run_export(
            remote, SPEC, str(tmp_path / "sl"), shard_size=25, client=client, resolution=res
        ),
        "local->s3": run_export(local, SPEC, f"{bucket}/out-ls", shard_size=25, client=client),
    }
    want = tars(str(tmp_path / "ll"))
    assert len(want) == base[S.MANIFEST_SHARDS] == 3
    for out in (f"{bucket}/out-ss", str(tmp_path / "sl"), f"{bucket}/out-ls"):
        assert tars(out) == want, out
        manifest = read_json(f"{out}/{S.EXPORT_MANIFEST}")
        assert manifest[S.MANIFEST_COUNT] == base[S.MANIFEST_COUNT] == len(res)
        assert not [p for p in url_to_fs(out)[0].ls(url_to_fs(out)[1]) if TMP_MARK in p]
    for name, manifest in runs.items():
        member = manifest[S.MANIFEST_MEMBER_BYTES]
        # the members' own bytes: the sum of the exported rows' recorded sizes
        meta = {r[S.KEY]: r for r in read_metadata(remote).to_pylist()}
        assert member == sum(meta[k][S.SOURCE_SIZE] for k in res.keys), name
        assert 0 < manifest[S.MANIFEST_BYTES_FETCHED] <= 1.2 * member, name
        assert manifest[S.MANIFEST_MISSING] == 0


def test_a_rerun_on_s3_writes_only_the_missing_shard(made, client, tmp_path, s3_server):
    bucket, remote = made["bucket"], made["remote"]
    res = remote_resolution(remote, SPEC, tmp_path)
    out = f"{bucket}/rerun"
    run_export(remote, SPEC, out, shard_size=25, client=client, resolution=res)
    first = tars(out)
    other = s3_server.filesystem()  # as another process would: not this one's s3fs instance
    base = out.removeprefix("s3://")
    other.rm([f"{base}/{S.shard_name(1)}", f"{base}/{S.stats_name(1)}", f"{base}/manifest.json"])
    seen: list[dict[str, int]] = []
    manifest = run_export(
        remote, SPEC, out, shard_size=25, client=client, resolution=res, on_progress=seen.append
    )
    assert seen[0] == {"shards_done": 2, "shards": 3, "samples": 0, "failed": 0}
    assert seen[-1]["samples"] == 25  # only shard 1 was written again
    assert tars(out) == first and manifest[S.MANIFEST_COUNT] == len(res)


def test_a_tampered_source_member_is_reported_not_exported(made, client, tmp_path, s3_bucket):
    fs, _ = url_to_fs(s3_bucket)
    src = made["bucket"].removeprefix("s3://")
    fs.copy(f"{src}/shards", f"{s3_bucket.removeprefix('s3://')}/shards", recursive=True)
    coll = collection_from_shards(f"{s3_bucket}/shards", f"{s3_bucket}/coll", dim=16)
    res = remote_resolution(coll, SPEC, tmp_path)
    victim = next(r for r in read_metadata(coll).to_pylist() if r[S.KEY] == res.keys[4])
    shard = victim[S.SOURCE_SHARD]
    data = bytearray(fs.cat_file(shard))
    middle = victim[S.SOURCE_OFFSET] + victim[S.SOURCE_SIZE] // 2
    data[middle : middle + 8] = bytes(255 - b for b in data[middle : middle + 8])
    fs.pipe_file(shard, bytes(data))  # same size: the byte range still "works", the sha256 not
    out = f"{s3_bucket}/out"
    manifest = run_export(coll, SPEC, out, shard_size=25, client=client, resolution=res)
    assert manifest[S.MANIFEST_COUNT] == len(res) - 1 and manifest[S.MANIFEST_MISSING] == 1
    stats = read_json(f"{out}/{S.stats_name(0)}")
    assert [(m["key"], m["reason"]) for m in stats["missing"]] == [(victim[S.KEY], I.CHANGED)]
    assert shard in stats["missing"][0]["why"] and stats["status_dict"][I.CHANGED] == 1
    names = {n for blob in tars(out).values() for n in _names(blob)}
    assert f"{victim[S.KEY]}.jpg" not in names and f"{res.keys[5]}.jpg" in names


def _names(blob: bytes) -> list[str]:
    return tarfile.open(fileobj=io.BytesIO(blob)).getnames()


def test_thumbnails_and_the_copy_checks_pictures_from_s3_shards(made, s3_server):
    from curation.pictures import thumbnails as thumbs_of
    from webui.thumbs import thumbnails

    local = read_metadata(made["local"]).to_pylist()[:12]
    remote = read_metadata(made["remote"]).to_pylist()[:12]
    assert all(r[S.SOURCE_SHARD].startswith("s3://") for r in remote)
    want = [t.jpeg for t in thumbnails(local)]
    assert all(j and j.startswith(b"\xff\xd8") for j in want)
    assert [t.jpeg for t in thumbnails(remote)] == want
    gone = thumbnails([dict(remote[0], source_shard=remote[0][S.SOURCE_SHARD] + ".missing")])
    assert gone[0].jpeg is None and "gone" in gone[0].why

    def pictures(rows, ranged):
        gone = {} if ranged else {S.SOURCE_OFFSET: None, S.SOURCE_SIZE: None}
        return thumbs_of([{**{c: r[c] for c in I.COLUMNS}, **gone} for r in rows])

    expected = pictures(local, True)
    assert len(expected) == len(local) and all(t is not None for t in expected)
    for rows, ranged in ((remote, True), (remote, False)):
        got = pictures(rows, ranged)
        assert all(np.array_equal(g, e) for g, e in zip(got, expected, strict=True))


def test_training_reads_an_s3_export(made, client, tmp_path):
    import yaml

    from hdit_train.data import ShardStream, batches, data_hash, read_manifest
    from hdit_train.train import train
    from tests.test_hdit import TINY_MODEL

    out = f"{made['bucket']}/train-export"
    manifest = run_export(made["local"], SPEC, out, shard_size=25, client=client)
    assert read_manifest(out) == manifest and len(data_hash(out)) == 16
    batch = next(batches(ShardStream(out, 16, cond="clip", shuffle_buffer=1).iterate(), 8))
    assert batch["image"].shape == (8, 3, 16, 16) and batch["emb"].shape == (8, 16)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": TINY_MODEL,
                "data": {"size": 16, "shuffle_buffer": 4},
                "train": {
                    "batch_size": 2,
                    "max_steps": 1,
                    "ckpt_every": 0,
                    "sample_every": 0,
                    "compile": False,
                },
                "sample": {"n": 1, "steps": 1},
            }
        )
    )
    run = train(out, str(cfg), str(tmp_path / "run"))
    state = json.loads((run / "state.json").read_text())
    assert state["spec_hash"] == manifest[S.MANIFEST_SPEC_HASH] and state["step"] == 1


def test_bad_s3_output_and_a_vanished_s3_source_get_one_line_errors(
    made, client, tmp_path, s3_bucket, s3_server
):
    with pytest.raises(ExportError, match=r"--out s3://no-such-bucket-sieve/x: .*does not exist"):
        run_export(made["local"], SPEC, "s3://no-such-bucket-sieve/x", client=client)
    assert not s3_server.filesystem().exists("no-such-bucket-sieve")  # not made in passing
    fs, _ = url_to_fs(s3_bucket)
    src = made["bucket"].removeprefix("s3://")
    fs.copy(f"{src}/shards", f"{s3_bucket.removeprefix('s3://')}/shards", recursive=True)
    coll = collection_from_shards(f"{s3_bucket}/shards", f"{s3_bucket}/coll", dim=16)
    res = remote_resolution(coll, SPEC, tmp_path)
    fs.rm(f"{s3_bucket.removeprefix('s3://')}/shards/00001.tar")
    out = str(tmp_path / "out")
    with pytest.raises(ExportError) as err:
        run_export(coll, SPEC, out, shard_size=25, client=client, resolution=res)
    message = str(err.value)
    assert f"{s3_bucket}/shards/00001.tar: source shard has vanished" in message
    assert "\n" not in message and not (tmp_path / "out" / S.EXPORT_MANIFEST).exists()


def test_the_command_exports_a_bucket_collection_into_a_bucket(made, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: big\nwhere: \"size != 'small'\"\n")
    out = f"{made['bucket']}/cli"
    subprocess.run(
        [sys.executable, "-m", "curation.export", made["remote"], str(spec), "--out", out]
        + ["--shard-size", "25", "--workers", "1"],
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    assert read_json(f"{out}/{S.EXPORT_MANIFEST}")[S.MANIFEST_COUNT] > 0


# ---- collection.images on local files ------------------------------------------------------
def test_merged_reads_stay_within_the_gap_share():
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(1, 50_000, 40)
        gaps = rng.integers(0, 20_000, 40)
        offsets = np.cumsum(sizes + gaps) - sizes
        plan = I.spans(offsets.tolist(), sizes.tolist())
        fetched = sum(e - s for s, e, _ in plan)
        assert fetched <= (1 + I.GAP_SHARE) * sizes.sum()
        assert sorted(m for _, _, ms in plan for m in ms) == list(range(40))
        for s, e, ms in plan:
            assert all(s <= offsets[m] and offsets[m] + sizes[m] <= e for m in ms)


def test_read_images_reports_each_row_and_never_raises(made, tmp_path):
    rows = read_metadata(made["local"]).to_pylist()[:6]
    upper = dict(rows[0], sha256=rows[0][S.SHA256].upper())  # recorded in another case
    unranged = dict(rows[1], source_offset=None, source_size=None)
    wrong = dict(rows[2], sha256=hashlib.sha256(b"another image").hexdigest())
    elsewhere = dict(rows[3], key="no-such-key", source_offset=None)
    gone = dict(rows[4], source_shard=str(tmp_path / "gone.tar"))
    nothing = dict(rows[5], source_shard=None)
    batch = I.read_images([upper, unranged, wrong, elsewhere, gone, nothing])
    assert [f.kind for f in batch.found] == [
        I.OK,
        I.OK,
        I.CHANGED,
        I.NOT_FOUND,
        I.GONE,
        I.NO_SOURCE,
    ]
    assert hashlib.sha256(batch.found[1].data).hexdigest() == rows[1][S.SHA256]
    assert "no-such-key" in batch.found[3].why and "gone.tar" in batch.found[4].why
    assert (batch.ranged, batch.scanned) == (1, 1)
    assert batch.member_bytes == rows[0][S.SOURCE_SIZE] + rows[1][S.SOURCE_SIZE]
    shard = Path(rows[0][S.SOURCE_SHARD]).stat().st_size
    # the range read, plus one scan of the shard for the unranged, wrong and unknown rows
    assert batch.bytes_fetched == rows[0][S.SOURCE_SIZE] + rows[2][S.SOURCE_SIZE] + shard
    assert I.read_images(read_metadata(made["local"]).slice(0, 3)).images == [
        f.data for f in I.read_images(read_metadata(made["local"]).to_pylist()[:3]).found
    ]
