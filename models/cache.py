"""The models Sieve trains for itself, and the cache that holds them
(`$SIEVE_CACHE`, ~/.cache/sieve).

Nothing can be downloaded here, so the offline defaults (the `sieve-tiny` CLIP, the watermark
detector) are trained by the project's own scripts on generated scenes. Each is a `Bundled`
entry: a cache folder, the module that trains it, and its recipe (everything that decides the
weights). A cached folder is current when its `train_info.json`, written last, holds the same
recipe; otherwise it is rebuilt. One cache serves the demo, the tests and every Dask worker.

Training takes minutes on two cores, so the repository also carries a packed copy of each
small bundled model (`models/weights/NAME.safetensors` + `NAME.json`: float16 tensors and the
recipe that made them, written by `python -m models.train NAME --pack`). On first use the
cache is filled from the packed copy when its recipe is the current one, and trained from
scratch otherwise. Both run in a child process (`python -m models.train NAME --out DIR`), so
the caller's torch settings are never touched, and the folder is renamed into place only
when complete.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from collection.storage import atomic_path, file_lock, read_json, write_json

log = logging.getLogger(__name__)

#: written last by every trainer: its recipe says the folder is complete and which weights it holds
INFO_FILE = "train_info.json"
_REPO = Path(__file__).resolve().parent.parent
#: packed copies of the bundled models, kept in the repository (float16; a few MB in all)
SHIPPED_DIR = Path(__file__).resolve().parent / "weights"


def cache_dir() -> Path:
    """The cache folder (`$SIEVE_CACHE`, else `~/.cache/sieve`), created on demand."""
    root = Path(os.environ.get("SIEVE_CACHE") or Path.home() / ".cache" / "sieve").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def build_once(ready: Callable[[], bool], build: Callable[[], None], lock_path: Path) -> None:
    """Run `build` unless `ready()`; one process at a time (file lock), re-checking after the wait.

    When several Dask workers or test processes ask at once, one builds and the others wait,
    then find the result.
    """
    if ready():
        return
    with file_lock(lock_path.with_suffix("")):  # collection.storage locks NAME.lock
        if not ready():
            build()


def _plain(value: Any) -> Any:
    """The value as JSON gives it back (tuples become lists),
    so recipes compare equal after a round trip."""
    return json.loads(json.dumps(value))


@dataclass(frozen=True)
class Bundled:
    """A model Sieve trains for itself: cache folder `name`,
    trained by `module.train(out, **recipe)`.

    `defaults` are the recipe's knobs (each also a `python -m models.train NAME --KNOB` option).
    Bump `version` when the training code changes what a recipe produces.
    """

    name: str
    module: str
    defaults: dict[str, Any] = field(default_factory=dict)
    version: int = 1
    about: str = ""

    @property
    def folder(self) -> Path:
        return cache_dir() / self.name

    @property
    def shipped(self) -> tuple[Path, Path]:
        """(tensors, description) of the packed copy in the repository."""
        return SHIPPED_DIR / f"{self.name}.safetensors", SHIPPED_DIR / f"{self.name}.json"

    def shipped_current(self) -> bool:
        """Whether the repository's packed copy was made with the current default recipe."""
        tensors, about = self.shipped
        doc = read_json(about)
        return tensors.is_file() and isinstance(doc, dict) and doc.get("recipe") == self.recipe()

    def recipe(self, **overrides: Any) -> dict[str, Any]:
        """The full recipe: defaults with `overrides`, plus the name and code version."""
        unknown = sorted(set(overrides) - set(self.defaults))
        if unknown:
            raise ValueError(
                f"{self.name}: unknown recipe option(s) {unknown}; known: {sorted(self.defaults)}"
            )
        return _plain({"model": self.name, "version": self.version, **self.defaults, **overrides})

    def trained_recipe(self, folder: Path | None = None) -> dict[str, Any] | None:
        """The recipe a folder was trained with, or None when it holds no complete training."""
        info = read_json((folder or self.folder) / INFO_FILE)
        return info.get("recipe") if isinstance(info, dict) else None

    def ready(self, folder: Path | None = None) -> bool:
        """Whether `folder` (default: the cache's) holds this model
        trained with the default recipe."""
        found = self.trained_recipe(folder)
        if found is None:
            return False
        if found != self.recipe():
            log.warning(
                "%s in %s was trained with another recipe: retraining",
                self.name,
                folder or self.folder,
            )
            return False
        return True

    def ensure(self) -> Path:
        """The cache folder, filled first
        (in a child process, under a file lock) when missing or stale."""
        folder = self.folder
        build_once(
            self.ready, lambda: self.train_into(folder), folder.parent / f".{self.name}.lock"
        )
        return folder

    def train_into(self, folder: Path, retrain: bool = False, **overrides: Any) -> Path:
        """Build the model with the recipe (defaults + overrides) in a child process, from the
        packed copy when it matches, else by training; `folder` appears only when done."""
        from_shipped = not retrain and not overrides and self.shipped_current()
        log.warning(
            "%s: %s into %s (once)",
            self.name,
            "unpacking the repository's copy"
            if from_shipped
            else f"training it ({self.about or 'a few minutes'})",
            folder,
        )
        args = [f"--{k.replace('_', '-')}={v}" for k, v in overrides.items()] + (
            ["--retrain"] if retrain else []
        )
        env = dict(os.environ)
        # the child imports this checkout even when the caller found it through its own sys.path
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO), env.get("PYTHONPATH", "")) if p)
        with atomic_path(folder) as tmp:
            done = subprocess.run(
                [sys.executable, "-m", "models.train", self.name, "--out", tmp, *args],
                env=env,
                stdout=subprocess.DEVNULL,
            )  # it prints the folder, which the caller knows
            if done.returncode != 0:
                raise RuntimeError(
                    f"training {self.name} failed (exit {done.returncode}); its output is above. "
                    f"Run `python -m models.train {self.name}` to retry."
                )
        return folder


def write_info(folder: str | Path, recipe: dict[str, Any], **facts: Any) -> None:
    """A trainer's last write: `train_info.json` with its recipe (the completion mark) and facts."""
    write_json(Path(folder) / INFO_FILE, {**facts, "recipe": _plain(recipe)})


def read_info(folder: str | Path) -> dict[str, Any]:
    """A built folder's `train_info.json` ({} when absent)."""
    return read_json(Path(folder) / INFO_FILE, missing={})


#: Every bundled model, by the name `python -m models.train NAME` and the cache folder use. The
#: defaults are each model's recipe knobs: its module's `train(out, **recipe)` takes exactly these.
BUNDLED: dict[str, Bundled] = {
    b.name: b
    for b in (
        Bundled(
            "sieve-tiny",
            "models.tiny_clip",
            {
                "seed": 0,
                "steps": 1400,
                "batch_size": 128,
                "n_samples": 30000,
                "lr": 1e-3,
                "width": 128,
                "layers": 3,
                "vision": "resnet",
                "hard_negatives": 2,
            },
            version=1,
            about="the offline CLIP; a few minutes on 2 cores",
        ),
        Bundled(
            "watermark",
            "models.watermark_cnn",
            {
                "seed": 0,
                "steps": 600,
                "batch_size": 64,
                "pool": 4096,
                "lr": 3e-3,
                "width": 32,
                "size": 64,
            },
            version=1,
            about="the watermark detector; about a minute on 2 cores",
        ),
        Bundled(
            "sieve-vqgan",
            "models.vqgan_train",
            {
                "seed": 0,
                "steps": 300,
                "batch_size": 16,
                "crop": 32,
                "n_samples": 3000,
                "lr": 2e-3,
                "ch": 32,
                "z_channels": 64,
                "levels": 3,
                "n_embed": 256,
                "embed_dim": 64,
            },
            version=1,
            about="the offline VQGAN for CLIP guidance; a few minutes on 2 cores",
        ),
    )
}
