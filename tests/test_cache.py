"""The bundled models' cache: build once, recipes that decide when a folder is current, and
training that leaves its caller's torch settings as they were (child process or isolated_torch)."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
import torch

from models.cache import BUNDLED, INFO_FILE, build_once, write_info


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
    with pytest.raises(ValueError, match=r"unknown recipe option\(s\) \['stepz'\]"):  # only the unknown one
        wm.recipe(stepz=3, pool=64)
    recipe = wm.recipe(steps=3)
    assert recipe["steps"] == 3 and recipe["model"] == "watermark" and recipe["version"] == wm.version
    assert {k: recipe[k] for k in wm.defaults if k != "steps"} == {k: v for k, v in wm.defaults.items() if k != "steps"}


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
    return (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
            torch.utils.deterministic.fill_uninitialized_memory)


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


@pytest.mark.parametrize("name, knobs", [("sieve-tiny", {"steps": 2, "n_samples": 64, "batch_size": 8}),
                                         ("watermark", QUICK_WATERMARK),
                                         ("sieve-vqgan", {"steps": 2, "n_samples": 8, "batch_size": 2, "crop": 16})])
def test_in_process_training_restores_torch_settings_and_rng(name: str, knobs: dict, tmp_path: Path) -> None:
    bundled = BUNDLED[name]
    train = importlib.import_module(bundled.module).train
    torch.use_deterministic_algorithms(False)
    torch.manual_seed(4321)
    rng, settings = torch.get_rng_state(), _torch_settings()
    assert not settings[1]  # training switches deterministic mode on (sieve-tiny): it must come back off
    train(tmp_path / name, **{**bundled.defaults, **knobs})
    assert _torch_settings() == settings
    assert torch.equal(torch.get_rng_state(), rng)
    assert bundled.trained_recipe(tmp_path / name) == bundled.recipe(**knobs)
