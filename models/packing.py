"""The packed copy of a bundled model that the repository carries (`models/weights/NAME.*`).

Floating-point tensors are stored as float16 (half the bytes; the models run in float32 after
loading, and `bench.clip_tiny` / `bench.watermark` measure the unpacked model), integer ones as
they are; the description JSON holds the recipe that made the weights and the facts of that
training run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from collection.storage import atomic_path, read_json, write_json
from models.cache import Bundled


def write_packed(bundled: Bundled, tensors: dict[str, torch.Tensor], about: dict[str, Any]) -> Path:
    """Write the packed copy (float tensors as float16) and its description, recipe included."""
    path, about_path = bundled.shipped
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(half, tmp)
    write_json(about_path, about)
    return path


def read_packed(bundled: Bundled) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors as float32, description) of the packed copy."""
    path, about_path = bundled.shipped
    tensors = {
        k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(path)).items()
    }
    return tensors, read_json(about_path)
