"""Sample from a trained run: `python -m hdit_train.sample --ckpt RUN --prompt "..." --out grid.png`.

Prompts are embedded with the CLIP text tower of the model named in the checkpoint (the
model was trained on CLIP image embeddings, which share the space); `--class N` picks a class
of a class-conditioned run. Guidance is classifier-free: the unconditional branch is the
dropped-condition slot the model saw in training.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)


def load_run(run: str | Path, device: str = "cpu", ema: bool = True):
    """(denoiser in eval mode, state dict from state.json) of a run folder."""
    from safetensors.torch import load_file

    from hdit_train.train import CKPT, STATE, build_model

    run = Path(run)
    if not (run / STATE).exists():
        raise FileNotFoundError(f"{run}: no {STATE}; is this a hdit_train run folder?")
    state = json.loads((run / STATE).read_text())
    model = build_model(state["config"], state.get("cond_dim", 0))
    prefix = "ema." if ema else "model."
    tensors = load_file(str(run / CKPT), device="cpu")
    model.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    return model.to(device).eval(), state


def cond_kwargs(cfg: dict[str, Any], n: int, encoder=None, prompts: Sequence[str] | None = None,
                class_label: int | None = None, device: str = "cpu",
                clip_gap: Sequence[float] | None = None) -> tuple[dict, dict]:
    """(conditional, unconditional) model kwargs for n samples.

    A CLIP-conditioned run saw image embeddings; prompts give text embeddings, which are moved
    by the run's measured modality gap (`clip_gap`, image mean - text mean) and renormalised.
    """
    import torch

    kind = cfg["cond"]["kind"]
    if kind == "class":
        if class_label is None:
            labels = torch.arange(n, device=device) % _num_classes(cfg)
        else:
            labels = torch.full((n,), int(class_label), device=device)
        return {"class_labels": labels}, {"class_labels": torch.full((n,), _num_classes(cfg), device=device)}
    if kind == "clip":
        if not prompts:
            raise ValueError("this run is CLIP-conditioned: give --prompt")
        if encoder is None:
            raise ValueError("CLIP-conditioned sampling needs the CLIP encoder")
        texts = [prompts[i % len(prompts)] for i in range(n)]
        emb = torch.from_numpy(encoder.encode_texts(texts)).to(device)
        if clip_gap is not None:
            emb = emb + torch.tensor(clip_gap, dtype=emb.dtype, device=device)
            emb = emb / emb.norm(dim=1, keepdim=True)
        return {"mapping_cond": emb}, {"mapping_cond": torch.zeros_like(emb)}
    return {}, {}


def _num_classes(cfg: dict[str, Any]) -> int:
    return cfg["model"].get("num_classes") or len(cfg["cond"]["classes"])


def generate(denoiser, cfg: dict[str, Any], n: int, size: int | tuple[int, int], cond: dict, uncond: dict,
             steps: int = 50, sampler: str = "dpmpp_2m", cfg_scale: float = 3.0, seed: int = 0,
             device: str = "cpu", sigma_min: float = 1e-2, sigma_max: float = 80.0):
    """n images in [-1, 1], (n, 3, H, W), deterministic for a seed."""
    import torch

    from hdit_train.diffusion import guided, karras_sigmas, sample

    h, w = (size, size) if isinstance(size, int) else size
    gen = torch.Generator(device=device).manual_seed(seed)
    sigmas = karras_sigmas(steps, sigma_min, sigma_max, device=device)
    x = torch.randn((n, 3, h, w), generator=gen, device=device) * sigmas[0]
    fn = guided(denoiser, cfg_scale, cond, uncond)
    return sample(fn, x, sigmas, sampler, generator=gen).clamp(-1, 1)


def save_grid(images, path: str | Path) -> Path:
    """Write a square-ish grid PNG of images in [-1, 1]."""
    import math

    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image((images + 1) / 2, str(path), nrow=max(1, int(math.ceil(math.sqrt(len(images))))), padding=1)
    return path


def save_sample_grid(denoiser, cfg: dict[str, Any], encoder, path: Path, device: str = "cpu",
                     clip_gap: Sequence[float] | None = None) -> Path:
    """The training loop's periodic grid: config prompts (CLIP) or one class per cell."""
    s = cfg["sample"]
    prompts = s.get("prompts") or ["a red circle", "a blue square", "a green triangle", "a yellow star"]
    cond, uncond = cond_kwargs(cfg, s["n"], encoder, prompts, device=device, clip_gap=clip_gap)
    images = generate(denoiser, cfg, s["n"], cfg["data"]["size"], cond, uncond, s["steps"],
                      s["sampler"], s["cfg"], device=device, sigma_max=s.get("sigma_max", 80.0))
    log.info("wrote %s", path)
    return save_grid(images, path)


def main(ckpt: str, out: str = "grid.png", prompt: list[str] | None = None, class_label: int | None = None,
         n: int = 16, steps: int = 50, sampler: str = "dpmpp_2m", cfg: float = 3.0, seed: int = 0,
         size: int | None = None, width: int | None = None, sigma_max: float = 80.0) -> Path:
    """Sample n images from the run's EMA weights and save a grid."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    denoiser, state = load_run(ckpt, device)
    config = state["config"]
    encoder = None
    if config["cond"]["kind"] == "clip":
        from pipelines.encoders import load_clip

        encoder = load_clip(state["clip_spec"], device=device)
    cond, uncond = cond_kwargs(config, n, encoder, prompt, class_label, device, state.get("clip_gap"))
    h = size or config["data"]["size"]
    images = generate(denoiser, config, n, (h, width or h), cond, uncond, steps, sampler, cfg, seed, device,
                      sigma_max=sigma_max)
    return save_grid(images.cpu(), out)


def cli(argv: list[str] | None = None) -> None:
    """Parse the command line and call main()."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True, help="run folder written by hdit_train.train")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--prompt", action="append", help="text prompt (repeat for several; cycled)")
    group.add_argument("--class", dest="class_label", type=int, help="class index")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--sampler", default="dpmpp_2m", choices=["euler", "heun", "dpmpp_2m", "dpmpp_2m_sde"])
    ap.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (1 = off)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=None, help="height (default: training size)")
    ap.add_argument("--width", type=int, default=None, help="width (default: = height)")
    ap.add_argument("--sigma-max", type=float, default=80.0, help="noise level sampling starts from")
    ap.add_argument("--out", default="grid.png")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    print(main(args.ckpt, args.out, args.prompt, args.class_label, args.n, args.steps, args.sampler,
               args.cfg, args.seed, args.size, args.width, args.sigma_max))


if __name__ == "__main__":
    cli()
