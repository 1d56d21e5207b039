"""The bundled models' cache: build once, recipes that decide when a folder is current, and
training that leaves its caller's torch settings as they were (child process or isolated_torch)."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.cache import BUNDLED, INFO_FILE, build_once, read_info, write_info


def test_build_once_builds_only_when_missing(tmp_path: Path) -> None:
    target = tmp_path / "model.bin"
    calls: list[int] = []

    def build() -> None:
        calls.append(1)
        target.write_text("weights")

    build_once(target.exists, build, tmp_path / ".lock")
    build_once(target.exists, build, tmp_path / ".lock")
    assert calls == [1]
    assert target.read_text() == "weights"


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_train_takes_exactly_the_recipe_knobs(name: str) -> None:
    """`python -m models.train NAME --KNOB` and the recipe check rely on train(out, **defaults)."""
    bundled = BUNDLED[name]
    train = importlib.import_module(bundled.module).train
    params = inspect.signature(train).parameters
    assert list(params)[0] == "out"
    assert set(params) == {"out", *bundled.defaults}
    # every knob is required: a default here could drift from the recipe's
    assert all(p.default is inspect.Parameter.empty for p in params.values())


def test_recipe_rejects_unknown_knobs() -> None:
    wm = BUNDLED["watermark"]
    with pytest.raises(
        ValueError, match=r"unknown recipe option\(s\) \['stepz'\]"
    ):  # only the unknown one
        wm.recipe(stepz=3, pool=64)
    recipe = wm.recipe(steps=3)
    assert (
        recipe["steps"] == 3 and recipe["model"] == "watermark" and recipe["version"] == wm.version
    )
    assert {k: recipe[k] for k in wm.defaults if k != "steps"} == {
        k: v for k, v in wm.defaults.items() if k != "steps"
    }


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_ready_only_for_the_current_recipe(name: str, tmp_path: Path) -> None:
    bundled = BUNDLED[name]
    folder = tmp_path / name
    assert not bundled.ready(folder)  # absent
    folder.mkdir()
    assert not bundled.ready(folder)  # no train_info.json: incomplete
    knob, value = next(iter(bundled.defaults.items()))
    other = value + 1 if isinstance(value, (int, float)) else f"{value}-other"
    write_info(folder, bundled.recipe(**{knob: other}), note="another recipe")
    assert not bundled.ready(folder)
    write_info(folder, bundled.recipe(), note="today's recipe")
    assert bundled.ready(folder)
    assert bundled.trained_recipe(folder) == bundled.recipe()


def _torch_settings() -> tuple:
    return (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.utils.deterministic.fill_uninitialized_memory,
    )


QUICK_WATERMARK = {"steps": 3, "pool": 64}


def test_train_into_runs_in_a_child_and_leaves_the_caller_alone(tmp_path: Path) -> None:
    from models import watermark_cnn

    wm = BUNDLED["watermark"]
    torch.manual_seed(1234)
    rng, settings = torch.get_rng_state(), _torch_settings()
    folder = tmp_path / "wm"
    assert wm.train_into(folder, **QUICK_WATERMARK) == folder
    assert _torch_settings() == settings
    assert torch.equal(torch.get_rng_state(), rng)
    assert (folder / watermark_cnn.MODEL_FILE).is_file() and (folder / INFO_FILE).is_file()
    assert wm.trained_recipe(folder) == wm.recipe(**QUICK_WATERMARK)
    assert not wm.ready(folder)  # trained, but not with the default recipe the cache wants
    assert [p.name for p in tmp_path.iterdir()] == ["wm"]  # no temporary folder left beside it
    model, size = watermark_cnn.load(folder / watermark_cnn.MODEL_FILE)
    assert size == wm.defaults["size"] and isinstance(model, watermark_cnn.WatermarkCNN)


def test_failed_child_training_leaves_no_folder(tmp_path: Path) -> None:
    folder = tmp_path / "wm"
    with pytest.raises(RuntimeError, match="models.train watermark"):
        BUNDLED["watermark"].train_into(folder, steps="not-a-number")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "name, knobs",
    [
        ("sieve-tiny", {"steps": 2, "n_samples": 64, "batch_size": 8}),
        ("watermark", QUICK_WATERMARK),
        ("sieve-vqgan", {"steps": 2, "n_samples": 8, "batch_size": 2, "crop": 16}),
    ],
)
def test_in_process_training_restores_torch_settings_and_rng(
    name: str, knobs: dict, tmp_path: Path
) -> None:
    bundled = BUNDLED[name]
    train = importlib.import_module(bundled.module).train
    torch.use_deterministic_algorithms(False)
    torch.manual_seed(4321)
    rng, settings = torch.get_rng_state(), _torch_settings()
    assert not settings[
        1
    ]  # training switches deterministic mode on (sieve-tiny): it must come back off
    train(tmp_path / name, **{**bundled.defaults, **knobs})
    assert _torch_settings() == settings
    assert torch.equal(torch.get_rng_state(), rng)
    assert bundled.trained_recipe(tmp_path / name) == bundled.recipe(**knobs)


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_the_repository_carries_each_model_for_its_current_recipe(name: str) -> None:
    """Change a recipe and this fails until
    `python -m models.train NAME --retrain --pack` is committed."""
    bundled = BUNDLED[name]
    tensors, about = bundled.shipped
    assert tensors.is_file() and about.is_file(), f"no packed copy of {name} in models/weights"
    assert bundled.shipped_current(), f"models/weights/{name}.json was made with another recipe"
    assert sum(p.stat().st_size for p in tensors.parent.glob("*.safetensors")) < 10 * 2**20


@pytest.mark.parametrize(
    "name, knobs",
    [
        ("sieve-tiny", {"steps": 2, "n_samples": 64, "batch_size": 8}),
        ("watermark", QUICK_WATERMARK),
        ("sieve-vqgan", {"steps": 2, "n_samples": 8, "batch_size": 2, "crop": 16}),
    ],
)
def test_pack_then_unpack_gives_back_the_trained_model(
    name: str, knobs: dict, tmp_path: Path, monkeypatch
) -> None:
    """float16 round trip; sieve-tiny's untouched embedding rows come back
    bit for bit from the seed."""
    monkeypatch.setattr("models.cache.SHIPPED_DIR", tmp_path / "weights")
    bundled = BUNDLED[name]
    module = importlib.import_module(bundled.module)
    module.train(tmp_path / "trained", **{**bundled.defaults, **knobs})
    module.pack(tmp_path / "trained")
    module.unpack(tmp_path / "unpacked")
    assert bundled.trained_recipe(tmp_path / "unpacked") == bundled.recipe(**knobs)
    weights = {
        "sieve-tiny": "open_clip_model.safetensors",
        "watermark": "watermark_cnn.pt",
        "sieve-vqgan": "last.ckpt",
    }[name]
    load = (
        (lambda p: load_file(str(p)))
        if name == "sieve-tiny"
        else (lambda p: torch.load(p, weights_only=True)["state_dict"])
    )
    before, after = load(tmp_path / "trained" / weights), load(tmp_path / "unpacked" / weights)
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=2e-3, atol=1e-4)
    if name == "sieve-tiny":
        rows_equal = (before["token_embedding.weight"] == after["token_embedding.weight"]).all(
            dim=1
        )
        assert rows_equal.sum() > 49000  # only the rows training touched were stored


def test_first_use_unpacks_the_repository_copy_instead_of_training(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("SIEVE_CACHE", str(tmp_path))
    folder = BUNDLED["watermark"].ensure()
    info = read_info(folder)
    assert "unpacked_from" in info and info["recipe"] == BUNDLED["watermark"].recipe()
