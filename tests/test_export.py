"""Export: webdataset shards read by the `webdataset` package and by hdit_train, the parquet and
urls formats, byte-range reads and their fallback, takedown re-checked at export time, resume
to byte-identical shards after a kill, and one-line errors for bad output or vanished sources."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.synthetic import collection_from_shards, write_takedown
from collection import schema as S
from collection.embeddings import EmbeddingStore
from collection.parts import read_metadata
from curation.export import export
from curation.export_shard import ExportError
from curation.resolve import resolve
from models.scenes import COLORS

REPO = Path(__file__).resolve().parent.parent
SPEC = {"name": "big", "where": "size != 'small'"}


@pytest.fixture(scope="module")
def client():
    from collection.cluster import open_cluster

    with open_cluster(workers=1, threads_per_worker=2, processes=False) as cluster:
        yield cluster.client


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, str]:
    from pipelines.generate import write_sample_dataset

    root = tmp_path_factory.mktemp("export")
    write_sample_dataset(root / "shards", 120, size=32, corrupt_fraction=0.05, shard_size=60)
    coll = collection_from_shards(str(root / "shards"), str(root / "coll"), dim=16)
    return {"root": str(root), "shards": str(root / "shards"), "coll": coll}


def _tars(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def _parquets(out: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("*.parquet"))])


def test_webdataset_export_reads_in_webdataset_and_hdit_train(made, client, tmp_path):
    import webdataset as wds

    from hdit_train.data import ShardStream, batches, read_manifest

    out = tmp_path / "out"
    res = resolve(made["coll"], SPEC)
    manifest = export(made["coll"], SPEC, str(out), shard_size=25, client=client)
    assert manifest == read_manifest(out)
    assert (
        manifest[S.MANIFEST_SPEC_HASH] == res.spec_hash
        and manifest[S.MANIFEST_COUNT] == len(res) > 40
    )
    assert manifest[S.MANIFEST_SHARDS] == len(list(out.glob("*.tar"))) == -(-len(res) // 25)
    assert manifest[S.MANIFEST_CLIP_MODEL] == "sieve-tiny" and manifest[S.MANIFEST_DIM] == 16
    assert sorted(p.name for p in out.glob("*_stats.json")) == [
        S.stats_name(i) for i in range(manifest["shards"])
    ]
    meta = {r["key"]: r for r in read_metadata(made["coll"]).to_pylist()}
    stored = EmbeddingStore.open(made["coll"], S.MODALITY_IMAGE).gather(res.ids).astype(np.float16)
    urls = [str(p) for p in sorted(out.glob("*.tar"))]
    seen = []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        key = sample["__key__"]
        seen.append(key)
        assert (
            hashlib.sha256(sample["jpg"]).hexdigest() == meta[key][S.SHA256]
        )  # the source's own bytes
        assert sample["txt"].decode() == meta[key][S.CAPTION]
        assert json.loads(sample["json"])["shape"] == meta[key]["shape"]
        emb = np.load(io.BytesIO(sample["img_emb.npy"]))
        assert emb.dtype == np.float16 and np.array_equal(emb, stored[len(seen) - 1])
    assert seen == res.keys
    batch = next(batches(ShardStream(out, 16, cond="clip", shuffle_buffer=1).iterate(), 8))
    assert (
        batch["image"].shape == (8, 3, 16, 16)
        and batch["emb"].shape == (8, 16)
        and batch["txt_emb"].shape == (8, 16)
    )


def test_trained_checkpoint_names_the_exports_spec_hash(made, client, tmp_path):
    import yaml

    from hdit_train.train import train
    from tests.test_hdit import TINY_MODEL

    out = tmp_path / "out"
    manifest = export(made["coll"], SPEC, str(out), shard_size=50, client=client)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": TINY_MODEL,
                "cond": {"kind": "class", "class_field": "color", "classes": list(COLORS)},
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
    run = train(str(out), str(cfg), str(tmp_path / "run"))
    state = json.loads((run / "state.json").read_text())
    assert state["spec_hash"] == manifest[S.MANIFEST_SPEC_HASH]


@pytest.mark.parametrize(
    "resize, size, want", [("center_crop", 16, (16, 16)), ("keep_ratio", 20, (20, 20))]
)
def test_resize_modes(made, client, tmp_path, resize, size, want):
    import webdataset as wds
    from PIL import Image

    out = tmp_path / "out"
    export(
        made["coll"],
        {"where": "true", "limit": 10},
        str(out),
        image_size=size,
        resize=resize,
        client=client,
    )
    samples = list(
        wds.WebDataset([str(p) for p in out.glob("*.tar")], shardshuffle=False, empty_check=False)
    )
    assert len(samples) == 10
    for s in samples:
        assert Image.open(io.BytesIO(s["jpg"])).size == want
        rec = json.loads(s["json"])
        assert (rec["width"], rec["height"]) == want and (
            rec["original_width"],
            rec["original_height"],
        ) == (32, 32)


def test_parquet_and_urls_formats(made, client, tmp_path):
    res = resolve(made["coll"], SPEC)
    export(made["coll"], SPEC, str(tmp_path / "pq"), shard_size=30, format="parquet", client=client)
    table = _parquets(tmp_path / "pq")
    assert table["key"].to_pylist() == res.keys
    assert [
        hashlib.sha256(b).hexdigest() for b in table[S.EXPORT_IMAGE_COLUMN].to_pylist()
    ] == table[S.SHA256].to_pylist()
    assert (
        len(table[S.EXPORT_IMG_EMB_COLUMN][0]) == 16
        and len(table[S.EXPORT_TXT_EMB_COLUMN][0]) == 16
    )
    manifest = export(made["coll"], SPEC, str(tmp_path / "urls"), format="urls", client=client)
    urls = _parquets(tmp_path / "urls")
    assert manifest[S.MANIFEST_FORMAT] == "urls" and urls["url"].to_pylist()[0].startswith(
        "http://sample.sieve.invalid/"
    )
    assert (
        urls["caption"].to_pylist() == table["caption"].to_pylist()
        and S.EXPORT_IMAGE_COLUMN not in urls.column_names
    )
    export(
        made["coll"], SPEC, str(tmp_path / "pq"), shard_size=30, client=client
    )  # now as webdataset, same place
    assert not list((tmp_path / "pq").glob("*.parquet")) and list((tmp_path / "pq").glob("*.tar"))


def test_rows_without_byte_offsets_are_read_from_their_shard(made, client, tmp_path):
    coll = str(tmp_path / "coll")
    shutil.copytree(made["coll"], coll)
    for path in Path(coll, "metadata").glob(
        "*.parquet"
    ):  # as parquet/files sources or older collections
        t = pq.read_table(path)
        for name in (S.SOURCE_OFFSET, S.SOURCE_SIZE):
            t = t.set_column(t.column_names.index(name), name, pa.nulls(len(t), pa.int64()))
        pq.write_table(t, path)
    export(made["coll"], SPEC, str(tmp_path / "ranged"), shard_size=40, client=client)
    export(coll, SPEC, str(tmp_path / "scanned"), shard_size=40, client=client)
    assert _tars(tmp_path / "ranged") == _tars(tmp_path / "scanned")


def test_takedown_is_checked_again_when_each_shard_is_written(made, client, tmp_path):
    from curation.export_job import run_export

    coll = str(tmp_path / "coll")
    shutil.copytree(made["coll"], coll)
    res = resolve(coll, SPEC)
    write_takedown(coll, keys=[res.keys[3]])  # listed after the spec was resolved
    manifest = run_export(
        coll, SPEC, str(tmp_path / "out"), shard_size=20, client=client, resolution=res
    )
    keys = [n for p in (tmp_path / "out").glob("*.tar") for n in tarfile.open(p).getnames()]
    assert not any(n.startswith(res.keys[3] + ".") for n in keys)
    assert manifest["taken_down_at_export"] == 1 and manifest[S.MANIFEST_COUNT] == len(res) - 1


def test_vanished_source_shard_is_named_and_a_rerun_continues(made, client, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(made["shards"], shards)
    coll = collection_from_shards(str(shards), str(tmp_path / "coll"), dim=16)
    moved = tmp_path / "away.tar"
    os.replace(shards / "00001.tar", moved)
    out = tmp_path / "out"
    with pytest.raises(ExportError) as err:
        export(coll, SPEC, str(out), shard_size=20, client=client)
    assert "00001.tar: source shard has vanished since embedding" in str(
        err.value
    ) and "\n" not in str(err.value)
    assert not (out / S.EXPORT_MANIFEST).exists() and not [
        p for p in out.iterdir() if ".tmp" in p.name
    ]
    assert (
        len(list(out.glob("*_stats.json"))) == len(list(out.glob("*.tar"))) > 0
    )  # the other shards are done
    os.replace(moved, shards / "00001.tar")
    export(coll, SPEC, str(out), shard_size=20, client=client)
    export(coll, SPEC, str(tmp_path / "whole"), shard_size=20, client=client)
    assert _tars(out) == _tars(tmp_path / "whole") and (out / S.EXPORT_MANIFEST).exists()


def test_bad_output_and_another_spec_in_the_same_output(made, client, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ExportError, match=r"--out .*a-file/out: not writable"):
        export(made["coll"], SPEC, str(tmp_path / "a-file" / "out"), client=client)
    with pytest.raises(ValueError, match="--resize center_crop needs --image-size"):
        export(made["coll"], SPEC, str(tmp_path / "o"), resize="center_crop", client=client)
    from curation.export import main

    assert main([made["coll"], "no-such-spec", "--out", str(tmp_path / "o2")]) == 1
    assert main([made["coll"], "no-such-spec", "--out", str(tmp_path / "a-file" / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --out ") and "no subset named 'no-such-spec'" in err[-2]
    out = str(tmp_path / "out")
    export(made["coll"], SPEC, out, client=client)
    with pytest.raises(ExportError, match="holds an export of another spec"):
        export(made["coll"], {"where": "true"}, out, client=client)
    assert (
        export(made["coll"], {"where": "true"}, out, overwrite=True, client=client)[S.MANIFEST_SPEC]
        is not None
    )
    with pytest.raises(ExportError, match="holds shards that are not a Sieve export"):
        export(made["coll"], SPEC, made["shards"], client=client)  # the source shards themselves
    assert (Path(made["shards"]) / "00000.tar").exists()


def test_progress_is_reported_per_shard_and_untrusted_specs_match(made, client, tmp_path):
    seen = []
    manifest = export(
        made["coll"],
        SPEC,
        str(tmp_path / "p"),
        shard_size=10,
        client=client,
        untrusted=True,
        on_progress=seen.append,
    )
    shards = manifest[S.MANIFEST_SHARDS]
    assert seen[0] == {"shards_done": 0, "shards": shards, "samples": 0, "failed": 0}
    assert [p["shards_done"] for p in seen] == list(range(shards + 1))
    assert seen[-1]["samples"] == manifest[S.MANIFEST_COUNT] == len(resolve(made["coll"], SPEC))
    again = []  # a rerun reuses every shard: told so once, nothing after
    export(
        made["coll"],
        SPEC,
        str(tmp_path / "p"),
        shard_size=10,
        client=client,
        on_progress=again.append,
    )
    assert again == [{"shards_done": shards, "shards": shards, "samples": 0, "failed": 0}]


def test_killed_export_resumes_to_byte_identical_shards(made, client, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: all\nwhere: 'true'\n")
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "curation.export",
            made["coll"],
            str(spec),
            "--out",
            str(out),
            "--shard-size",
            "3",
            "--workers",
            "1",
        ],
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 240
        while not list(out.glob("*_stats.json")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # the command and its Dask workers, mid-export
    finally:
        proc.wait(timeout=60)
    assert not (out / S.EXPORT_MANIFEST).exists(), "the export finished before it could be killed"
    finished = {
        p.name: p.stat().st_mtime_ns
        for p in out.glob("*.tar")
        if (out / S.stats_name(int(p.stem))).exists()
    }
    export(made["coll"], str(spec), str(out), shard_size=3, client=client)  # the rerun
    export(made["coll"], str(spec), str(tmp_path / "whole"), shard_size=3, client=client)
    assert 0 < len(finished) < len(list(out.glob("*.tar")))
    assert {
        n: (out / n).stat().st_mtime_ns for n in finished
    } == finished  # kept, not written again
    assert _tars(out) == _tars(tmp_path / "whole")
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
