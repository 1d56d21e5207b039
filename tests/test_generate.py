"""The sample writer produces img2dataset-format shards whose parts agree with each other."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from models import scenes
from models.scenes import COLORS, SHAPES, matches
from pipelines import generate as sample

REPO = Path(__file__).resolve().parents[1]


def _read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    sample.write_sample_dataset(
        out, n=230, size=48, seed=7, watermark_fraction=0.2, corrupt_fraction=0.1, shard_size=100
    )
    return out


def test_layout_and_counts(shards: Path) -> None:
    names = sorted(p.name for p in shards.iterdir())
    assert names == [
        "00000.parquet",
        "00000.tar",
        "00000_stats.json",
        "00001.parquet",
        "00001.tar",
        "00001_stats.json",
        "00002.parquet",
        "00002.tar",
        "00002_stats.json",
    ]
    counts = [json.loads((shards / f"0000{i}_stats.json").read_text())["count"] for i in range(3)]
    assert counts == [100, 100, 30]


@pytest.mark.parametrize("shard", [0, 2])
def test_tar_parquet_json_agree(shards: Path, shard: int) -> None:
    members = _read_tar(shards / f"0000{shard}.tar")
    table = pq.read_table(shards / f"0000{shard}.parquet").to_pylist()
    stats = json.loads((shards / f"0000{shard}_stats.json").read_text())
    assert [r["key"] for r in table] == list(members)
    assert stats["count"] == len(table) == len(members)
    assert stats["corrupt"] == sum(r["corrupt"] for r in table)
    assert stats["watermarked"] == sum(r["watermark"] for r in table)
    for row in table:
        parts = members[row["key"]]
        assert set(parts) == {"jpg", "txt", "json"}
        meta = json.loads(parts["json"])
        assert parts["txt"].decode() == row["caption"] == meta["caption"]
        assert meta["key"] == row["key"] and meta["shape"] == row["shape"]
        assert row["shape"] in SHAPES and row["color"] in COLORS
        assert row["color"] in row["caption"]
        try:
            Image.open(io.BytesIO(parts["jpg"])).convert("RGB")
            decodes = True
        except OSError:
            decodes = False
        if not row["corrupt"]:
            assert decodes, f"clean sample {row['key']} does not decode"
        assert meta["corrupt"] == row["corrupt"]


def test_corrupt_samples_are_marked_and_broken(shards: Path) -> None:
    broken = 0
    marked = 0
    for shard in range(3):
        members = _read_tar(shards / f"0000{shard}.tar")
        for _key, parts in members.items():
            meta = json.loads(parts["json"])
            if meta["corrupt"]:
                marked += 1
                try:
                    Image.open(io.BytesIO(parts["jpg"])).load()
                except OSError:
                    broken += 1
    assert marked > 5
    assert broken == marked


def test_webdataset_reads_shards(shards: Path) -> None:
    wds = pytest.importorskip("webdataset")
    ds = wds.WebDataset(str(shards / "00000.tar"), shardshuffle=False)
    samples = list(ds)
    assert len(samples) == 100
    assert {"__key__", "jpg", "txt", "json"} <= set(samples[0])


def test_deterministic_per_seed_and_independent_of_sharding(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    sample.write_sample_dataset(a, n=20, seed=1, shard_size=20)
    sample.write_sample_dataset(b, n=20, seed=1, shard_size=20)
    sample.write_sample_dataset(c, n=20, seed=2, shard_size=20)
    assert (a / "00000.tar").read_bytes() == (b / "00000.tar").read_bytes()
    assert (a / "00000.tar").read_bytes() != (c / "00000.tar").read_bytes()
    in_memory = [s.caption for s in scenes.iter_samples(20, seed=1, shard_size=20)]
    assert in_memory == [r["caption"] for r in pq.read_table(a / "00000.parquet").to_pylist()]


def test_watermark_changes_pixels() -> None:
    rng = np.random.default_rng(0)
    img = scenes.render_scene(scenes.random_scene(rng), 64, rng)
    marked = scenes.add_watermark(img, np.random.default_rng(1), words=["HELDOUT"])
    diff = np.abs(np.asarray(marked, dtype=int) - np.asarray(img, dtype=int))
    assert diff.max() > 40


def test_caption_names_true_attributes() -> None:
    for s in scenes.iter_samples(200, seed=5):
        assert {"color", "shape"} <= set(s.attrs["named"])
        assert matches(s.attrs, s.attrs["named"], s.attrs)
        assert s.attrs["color"] in s.caption
        assert s.attrs["shape"] in s.caption


def test_bad_arguments_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="corrupt_fraction"):
        sample.write_sample_dataset(tmp_path, n=5, corrupt_fraction=1.5)


def test_cli(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.generate",
            "--out",
            str(tmp_path),
            "--n",
            "12",
            "--size",
            "32",
            "--shard-size",
            "5",
            "--corrupt-fraction",
            "0.5",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    totals = json.loads(out.stdout.strip().splitlines()[-1])
    assert totals["count"] == 12 and totals["shards"] == 3
    assert (tmp_path / "00002.tar").exists()


def test_object_sizes_restrict_the_drawn_sizes():
    drawn = [
        s.attrs["size"] for s in scenes.iter_samples(200, size=32, object_sizes=("medium", "large"))
    ]
    assert set(drawn) == {"medium", "large"}
    every = {s.attrs["size"] for s in scenes.iter_samples(200, size=32)}
    assert every == {"small", "medium", "large"}
    with pytest.raises(ValueError, match="tiny"):
        next(scenes.iter_samples(1, object_sizes=("tiny",)))


def test_mismatched_captions_are_swapped_and_marked(tmp_path: Path) -> None:
    """`--mismatch-fraction`: another sample's caption, naming another colour or shape, marked in
    the json; deterministic per seed; without it the shards are unchanged."""
    out = tmp_path / "swapped"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.generate",
            "--out",
            str(out),
            "--n",
            "200",
            "--size",
            "16",
            "--seed",
            "3",
            "--mismatch-fraction",
            "0.25",
            "--shard-size",
            "100",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert 30 < json.loads(done.stdout)["mismatched"] < 70
    rows = (
        pq.read_table(out / "00000.parquet").to_pylist()
        + pq.read_table(out / "00001.parquet").to_pylist()
    )
    by_key = {r["key"]: r for r in rows}
    members = _read_tar(out / "00001.tar")
    for row in rows:
        own = scenes.make_sample(int(row["key"][:5]) * 100 + int(row["key"][5:]), 16, 3, 0.1, 100)
        if row["mismatched"]:
            other = by_key[row["caption_of"]]
            assert (
                row["caption"]
                == scenes.make_sample(
                    int(other["key"][:5]) * 100 + int(other["key"][5:]), 16, 3, 0.1, 100
                ).caption
            )
            assert (other["color"], other["shape"]) != (row["color"], row["shape"])
            assert (row["color"], row["shape"]) == (
                own.attrs["color"],
                own.attrs["shape"],
            )  # the image's truth
        else:
            assert row["caption"] == own.caption and row["caption_of"] is None
        if row["key"] in members:
            assert members[row["key"]]["txt"].decode() == row["caption"]
            assert json.loads(members[row["key"]]["json"])["mismatched"] == row["mismatched"]
    again = tmp_path / "again"
    sample.write_sample_dataset(
        again, n=200, size=16, seed=3, mismatch_fraction=0.25, shard_size=100
    )
    assert (again / "00001.tar").read_bytes() == (out / "00001.tar").read_bytes()
    plain = tmp_path / "plain"
    sample.write_sample_dataset(plain, n=100, size=16, seed=3, shard_size=100)
    assert "mismatched" not in pq.read_table(plain / "00000.parquet").column_names
