"""Sampling from a trained HDiT run: conditioning inputs, the sampler loop, image grids.

Prompts are embedded with the CLIP text tower of the model named in the run (the model was
trained on CLIP image embeddings, which share the space); guidance is classifier-free: the
unconditional branch is the dropped-condition slot the model saw in training.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torchvision.utils import save_image

from hdit_train.diffusion import guided, karras_sigmas, sample
from hdit_train.run import load_run
from models.clip import load_clip

log = logging.getLogger(__name__)


def cond_kwargs(
    cfg: dict[str, Any],
    n: int,
    encoder=None,
    prompts: Sequence[str] | None = None,
    class_label: int | None = None,
    device: str = "cpu",
    clip_gap: Sequence[float] | None = None,
) -> tuple[dict, dict]:
    """(conditional, unconditional) model kwargs for n samples.

    A CLIP-conditioned run saw image embeddings; prompts give text embeddings, which are moved
    by the run's measured modality gap (`clip_gap`, image mean - text mean) and renormalised.
    """
    kind = cfg["cond"]["kind"]
    if kind == "class":
        if class_label is None:
            labels = torch.arange(n, device=device) % _num_classes(cfg)
        else:
            labels = torch.full((n,), int(class_label), device=device)
        return {"class_labels": labels}, {
            "class_labels": torch.full((n,), _num_classes(cfg), device=device)
        }
    if kind == "clip":
        if not prompts:
            raise ValueError("this run is CLIP-conditioned: give --prompt")
        if encoder is None:
            raise ValueError("CLIP-conditioned sampling needs the CLIP encoder")
        texts = [prompts[i % len(prompts)] for i in range(n)]
        emb = shift_by_gap(torch.from_numpy(encoder.encode_texts(texts)).to(device), clip_gap)
        return {"mapping_cond": emb}, {"mapping_cond": torch.zeros_like(emb)}
    return {}, {}


def shift_by_gap(emb: torch.Tensor, clip_gap: Sequence[float] | None) -> torch.Tensor:
    """Text embeddings (n, dim) moved by the run's measured modality gap and
    renormalised (unchanged without one)."""
    if clip_gap is None:
        return emb
    emb = emb + torch.tensor(clip_gap, dtype=emb.dtype, device=emb.device)
    return emb / emb.norm(dim=1, keepdim=True)


def _num_classes(cfg: dict[str, Any]) -> int:
    return cfg["model"].get("num_classes") or len(cfg["cond"]["classes"])


def generate(
    denoiser,
    cfg: dict[str, Any],
    n: int,
    size: int | tuple[int, int],
    cond: dict,
    uncond: dict,
    steps: int = 50,
    sampler: str = "dpmpp_2m",
    cfg_scale: float = 3.0,
    seed: int = 0,
    device: str = "cpu",
    sigma_min: float = 1e-2,
    sigma_max: float = 80.0,
):
    """n images in [-1, 1], (n, 3, H, W), deterministic for a seed."""
    h, w = (size, size) if isinstance(size, int) else size
    gen = torch.Generator(device=device).manual_seed(seed)
    sigmas = karras_sigmas(steps, sigma_min, sigma_max, device=device)
    x = torch.randn((n, 3, h, w), generator=gen, device=device) * sigmas[0]
    fn = guided(denoiser, cfg_scale, cond, uncond)
    return sample(fn, x, sigmas, sampler, generator=gen).clamp(-1, 1)


def save_grid(images, path: str | Path) -> Path:
    """Write a square-ish grid PNG of images in [-1, 1]."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(
        (images + 1) / 2, str(path), nrow=max(1, int(math.ceil(math.sqrt(len(images))))), padding=1
    )
    return path


def save_sample_grid(
    denoiser,
    cfg: dict[str, Any],
    encoder,
    path: Path,
    device: str = "cpu",
    clip_gap: Sequence[float] | None = None,
) -> Path:
    """The training loop's periodic grid: config prompts (CLIP) or one class per cell."""
    s = cfg["sample"]
    prompts = s.get("prompts") or [
        "a red circle",
        "a blue square",
        "a green triangle",
        "a yellow star",
    ]
    cond, uncond = cond_kwargs(cfg, s["n"], encoder, prompts, device=device, clip_gap=clip_gap)
    images = generate(
        denoiser,
        cfg,
        s["n"],
        cfg["data"]["size"],
        cond,
        uncond,
        s["steps"],
        s["sampler"],
        s["cfg"],
        device=device,
        sigma_max=s.get("sigma_max", 80.0),
    )
    log.info("wrote %s", path)
    return save_grid(images, path)


def sample_images(
    ckpt: str,
    prompt: list[str] | None = None,
    class_label: int | None = None,
    n: int = 16,
    steps: int = 50,
    sampler: str = "dpmpp_2m",
    cfg: float = 3.0,
    seed: int = 0,
    size: int | None = None,
    width: int | None = None,
    sigma_max: float = 80.0,
) -> torch.Tensor:
    """n images in [-1, 1] (n, 3, H, W, on the CPU) from the run's EMA weights."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    denoiser, state = load_run(ckpt, device)
    config = state["config"]
    encoder = None
    if config["cond"]["kind"] == "clip":
        encoder = load_clip(state["clip_spec"], device=device)
    cond, uncond = cond_kwargs(
        config, n, encoder, prompt, class_label, device, state.get("clip_gap")
    )
    h = size or config["data"]["size"]
    images = generate(
        denoiser,
        config,
        n,
        (h, width or h),
        cond,
        uncond,
        steps,
        sampler,
        cfg,
        seed,
        device,
        sigma_max=sigma_max,
    )
    return images.cpu()


def sample_grid(
    ckpt: str,
    out: str = "grid.png",
    prompt: list[str] | None = None,
    class_label: int | None = None,
    n: int = 16,
    steps: int = 50,
    sampler: str = "dpmpp_2m",
    cfg: float = 3.0,
    seed: int = 0,
    size: int | None = None,
    width: int | None = None,
    sigma_max: float = 80.0,
) -> Path:
    """Sample n images from the run's EMA weights and save a grid."""
    images = sample_images(
        ckpt, prompt, class_label, n, steps, sampler, cfg, seed, size, width, sigma_max
    )
    return save_grid(images, out)
