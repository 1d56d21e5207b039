"""A training run's folder and config: what `hdit_train.train` writes and `.sample` / `.guide` read.

A run folder holds `config.yaml`, `checkpoint.safetensors` (model, EMA, optimizer moments,
RNG) and `state.json` (step, data hash, CLIP spec, the export's spec hash, ...), both written
atomically, plus `loss.jsonl` and `samples/step_N.png`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_file, save_file

from collection.storage import atomic_path, write_json
from hdit_train.diffusion import Denoiser
from hdit_train.model import HDiT, HDiTConfig

CKPT, STATE = "checkpoint.safetensors", "state.json"
DEFAULTS: dict[str, Any] = {
    "cond": {
        "kind": "none",
        "class_field": None,
        "classes": None,
        "clip_spec": "sieve-tiny",
        "dropout": 0.1,
        "noise": 0.0,
        "text_shift": True,
        "text_prob": 0.0,
    },
    "data": {"size": 64, "shuffle_buffer": 1000, "seed": 0},
    "diffusion": {"sigma_data": 0.5, "noise_d_low": 32, "sigma_min": 1e-3, "sigma_max": 1e3},
    "train": {
        "batch_size": 8,
        "lr": 5e-4,
        "weight_decay": 0.01,
        "betas": [0.9, 0.95],
        "eps": 1e-8,
        "warmup_steps": 100,
        "max_steps": 1000,
        "max_minutes": None,
        "grad_clip": 1.0,
        "ema_decay": 0.999,
        "log_every": 10,
        "sample_every": 500,
        "ckpt_every": 500,
        "gradient_checkpointing": False,
        "compile": True,
        "bf16": True,
        "seed": 0,
    },
    "sample": {
        "n": 16,
        "steps": 50,
        "sampler": "dpmpp_2m",
        "cfg": 3.0,
        "sigma_max": 80.0,
        "prompts": None,
    },
}


def load_config(path: str | Path) -> dict[str, Any]:
    """A YAML config merged over DEFAULTS (section by section); `model` is required."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if "model" not in raw:
        raise ValueError(f"{path}: config needs a 'model' section (patch_size, levels, mapping)")
    cfg = {k: {**v, **(raw.get(k) or {})} for k, v in DEFAULTS.items()}
    cfg["model"] = raw["model"]
    unknown = set(raw) - set(cfg)
    if unknown:
        raise ValueError(f"{path}: unknown config sections {sorted(unknown)}")
    return cfg


def build_model(cfg: dict[str, Any], cond_dim: int = 0):
    """The HDiT for a config; the conditioning inputs follow cfg['cond']."""
    model_cfg = dict(cfg["model"])
    kind = cfg["cond"]["kind"]
    if kind == "class":
        classes = cfg["cond"].get("classes")
        model_cfg.setdefault(
            "num_classes", len(classes) if classes else cfg["cond"].get("num_classes", 0)
        )
        if not model_cfg["num_classes"]:
            raise ValueError("class conditioning needs cond.classes (a list) or model.num_classes")
    elif kind == "clip":
        model_cfg["mapping_cond_dim"] = cond_dim
    elif kind != "none":
        raise ValueError(f"cond.kind must be none, class or clip, not {kind!r}")
    return Denoiser(HDiT(HDiTConfig.from_dict(model_cfg)), cfg["diffusion"]["sigma_data"])


def save_checkpoint(out: Path, tensors: dict[str, Any], state: dict[str, Any]) -> None:
    """Write checkpoint.safetensors, then state.json, each atomically
    (state last: it names the checkpoint's step)."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / CKPT) as tmp:
        save_file(tensors, tmp)
    write_json(out / STATE, state)


def load_run(run: str | Path, device: str = "cpu", ema: bool = True):
    """(denoiser in eval mode, state dict from state.json) of a run folder."""
    run = Path(run)
    if not (run / STATE).exists():
        raise FileNotFoundError(f"{run}: no {STATE}; is this a hdit_train run folder?")
    state = json.loads((run / STATE).read_text())
    model = build_model(state["config"], state.get("cond_dim", 0))
    prefix = "ema." if ema else "model."
    tensors = load_file(str(run / CKPT), device="cpu")
    model.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    return model.to(device).eval(), state
