"""The memorisation audit: a planted copy of a training image is flagged, fresh scenes are not,
the report and the closest-pairs grid are written, and bad input is one clear line."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image, ImageEnhance

from collection.shards import list_shards, read_shard
from curation.dedup import COPY_MIN_COSINE
from hdit_train.memorisation import audit, copy_verdicts, read_images
from models.scenes import make_sample
from tests.test_hdit import TINY_MODEL


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> dict[str, Path]:
    """Generated shards, embedded with sieve-tiny, with an image index."""
    from indices.build import build
    from pipelines.embed import embed
    from pipelines.generate import write_sample_dataset

    root = tmp_path_factory.mktemp("audit")
    write_sample_dataset(root / "shards", 120, seed=0, shard_size=60)
    embed(str(root / "shards"), str(root / "collection"), workers=1)
    build(str(root / "collection"), max_index_memory="100M", modality="image")
    return {"shards": root / "shards", "collection": root / "collection"}


@pytest.fixture(scope="module")
def generated(collection, tmp_path_factory) -> tuple[Path, str]:
    """A folder of 'generations': a planted copy of a training image (re-encoded as PNG), a
    brightened copy, and two scenes drawn with another seed; returns
    (folder, the copied training key)."""
    folder = tmp_path_factory.mktemp("generated")
    raw = next(s for s in read_shard(list_shards(str(collection["shards"]))[1]) if s.image)
    original = Image.open(io.BytesIO(raw.image)).convert("RGB")
    original.save(folder / "b_copy.png")
    ImageEnhance.Brightness(original).enhance(1.25).save(folder / "c_brighter.png")
    for i in range(2):
        make_sample(i, seed=999).image.convert("RGB").save(folder / f"a_fresh{i}.png")
    return folder, raw.key


def test_the_audit_flags_a_planted_copy_and_only_it(collection, generated, tmp_path):
    folder, key = generated
    result = audit(read_images(folder), str(collection["collection"]), k=3, out=tmp_path / "report")
    entries = {e["image"]: e for e in result.report["images"]}
    assert sorted(entries) == ["a_fresh0.png", "a_fresh1.png", "b_copy.png", "c_brighter.png"]
    for name in ("b_copy.png", "c_brighter.png"):
        copy = entries[name]
        assert (
            copy["copy"] and copy["neighbours"][0]["key"] == key and copy["neighbours"][0]["copy"]
        ), name
        assert len(copy["neighbours"]) == 3 and not any(n["copy"] for n in copy["neighbours"][1:])
        assert all(n["picture"] for n in copy["neighbours"])
    assert not entries["a_fresh0.png"]["copy"] and not entries["a_fresh1.png"]["copy"]
    assert result.copy_fraction == pytest.approx(2 / 4)
    assert json.loads(result.report_path.read_text())["n_copies"] == 2
    assert result.report["rule"]["source"].startswith("curation.copies.copy_verdict")
    grid = Image.open(result.grid_path)
    assert grid.size == (8 * 64 + 9 * 2, 64 + 2 * 2)  # four [generated | training] pairs in a row


def test_the_copy_rule_is_the_duplicates_rule_on_the_pictures():
    """A resized copy is a copy; another scene of the same kind is not, however similar its
    embedding; a neighbour below the cosine floor or without a readable
    picture is not called one."""
    scene, other = (
        make_sample(3, seed=5).image.convert("RGB"),
        make_sample(4, seed=5).image.convert("RGB"),
    )
    pictures = {"same": scene.resize((48, 48)), "other": other}
    rows = [
        {"key": "same", "similarity": 0.9},
        {"key": "other", "similarity": 0.99},
        {"key": "same", "similarity": COPY_MIN_COSINE - 0.01},
        {"key": "gone", "similarity": 0.99},
    ]
    assert copy_verdicts(scene, rows, pictures) == [True, False, False, False]


def test_the_command_and_its_bad_input(collection, generated, tmp_path, capsys):
    from hdit_train.audit import main

    folder, _ = generated
    report = main(
        ["--images", str(folder), "--collection", str(collection["collection"]), "--k", "2"]
    )
    assert (
        report == folder / "audit" / "audit.json"
        and "2 of 4 generated images copy" in capsys.readouterr().out
    )
    (tmp_path / "empty").mkdir()
    no_index = tmp_path / "no_index"
    shutil.copytree(collection["collection"], no_index, ignore=shutil.ignore_patterns("indices"))
    for args, named in [
        (
            ["--images", str(tmp_path / "empty"), "--collection", str(collection["collection"])],
            "no image files",
        ),
        (
            ["--images", str(tmp_path / "absent"), "--collection", str(collection["collection"])],
            "no such folder",
        ),
        (["--images", str(folder), "--collection", str(no_index)], "no image index"),
    ]:
        with pytest.raises(SystemExit):
            main(args)
        assert named in capsys.readouterr().err
    (folder / "notes.png").write_text("not an image")
    try:
        with pytest.raises(SystemExit):
            main(["--images", str(folder), "--collection", str(collection["collection"])])
        assert "notes.png cannot be read" in capsys.readouterr().err
    finally:
        (folder / "notes.png").unlink()


def test_sample_with_audit_reports_on_what_it_sampled(collection, tmp_path):
    from hdit_train.sample import sample
    from hdit_train.train import train

    cfg = {
        "model": TINY_MODEL,
        "data": {"size": 16, "shuffle_buffer": 8},
        "train": {
            "batch_size": 4,
            "max_steps": 2,
            "warmup_steps": 1,
            "log_every": 1,
            "ckpt_every": 0,
            "sample_every": 0,
            "compile": False,
        },
        "sample": {"n": 2, "steps": 2},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    run = train(str(collection["shards"]), str(tmp_path / "cfg.yaml"), str(tmp_path / "run"))
    grid = sample(
        str(run), str(tmp_path / "grid.png"), n=3, steps=2, audit=str(collection["collection"])
    )
    report = json.loads((tmp_path / "grid_audit" / "audit.json").read_text())
    assert grid.exists() and report["n_images"] == 3 and 0 <= report["copy_fraction"] <= 1
    assert all(len(e["neighbours"]) == 5 for e in report["images"])
