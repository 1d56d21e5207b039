"""CLIP-guided diffusion on a trained HDiT run: the CLIP-Guided-Diffusion reference's `cond_fn`.

At every sampler step the denoised prediction is blended with the noisy input (weight
sqrt(1 - ᾱ) on the prediction, the reference's `fac`; here σ/√(1+σ²) with the input brought to
the variance-preserving scale), the CLIP loss of that blend plus total-variation and range
terms (and the init-weight distance when editing) is differentiated through the model to the
noisy input, and the prediction is moved along that gradient by σ² (k-diffusion's
`make_cond_model_fn`). It works on top of the run's own CLIP conditioning (classifier-free
guided toward the prompts) or without it (the unconditional slot). Editing starts from the
init image noised to the level of the first step kept (`init_skip`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from hdit_train.diffusion import guided, karras_sigmas, sample
from hdit_train.guide_loss import ClipObjective, GuidanceError, range_loss, tv_loss
from hdit_train.sampling import shift_by_gap
from models.clip import Clip
from models.prompts import WeightedPrompt, combine
from models.runtime import progress


@dataclass
class HDiTGuidance:
    """The settings of one guided sampling (the reference's scales, adapted to EDM σ).

    `init_weight` weighs the squared pixel distance (in [0, 1] units, halved) to the init image
    against the CLIP loss, as the init-weight term of the other generators does.
    """

    steps: int = 50
    sampler: str = "dpmpp_2m_sde"
    clip_scale: float = 1000.0
    tv_scale: float = 50.0
    range_scale: float = 50.0
    init_weight: float = 0.0
    init_skip: float = 0.5
    use_cond: bool = True
    cfg: float = 3.0
    sigma_min: float = 1e-2
    sigma_max: float = 20.0


def check_size(cfg: dict[str, Any], size: tuple[int, int]) -> None:
    """GuidanceError unless the run's HDiT can make an image of this size."""
    m = cfg["model"]
    p = m.get("patch_size", 4) * 2 ** (len(m["levels"]) - 1)
    if size[0] % p or size[1] % p:
        raise GuidanceError(
            f"size {size[0]}x{size[1]}: this HDiT run makes sides that are multiples of {p}"
        )


def run_condition(
    state: dict[str, Any], clip: Clip, texts: list[WeightedPrompt], use_cond: bool, device: str
) -> tuple[dict, dict]:
    """(cond, uncond) model kwargs for one sample, as `diffusion.guided` takes them: the weighted
    text prompts' combined embedding against the dropped-condition slot when the run is
    CLIP-conditioned and `use_cond`; else the unconditional slot alone (uncond empty: no
    classifier-free guidance)."""
    cfg = state["config"]
    kind = cfg["cond"]["kind"]
    if kind == "class":
        slot = cfg["model"].get("num_classes") or len(cfg["cond"]["classes"])
        return {"class_labels": torch.full((1,), slot, device=device)}, {}
    if kind != "clip":
        return {}, {}
    zero = {"mapping_cond": torch.zeros((1, state.get("cond_dim") or clip.dim), device=device)}
    if not use_cond or not texts:
        return zero, {}
    if state.get("clip_spec") and state["clip_spec"] != clip.spec:
        raise GuidanceError(
            f"the run is conditioned on {state['clip_spec']} embeddings; guide it with that "
            f"CLIP (--clip-model {state['clip_spec']}) or without its conditioning (--no-cond)"
        )
    emb = torch.from_numpy(combine(clip.encode_texts([p.text for p in texts]), texts)).to(device)[
        None
    ]
    return {"mapping_cond": shift_by_gap(emb, state.get("clip_gap"))}, zero


def clip_guided_sample(
    denoiser: Callable,
    state: dict[str, Any],
    clip: Clip,
    objective: ClipObjective | None,
    texts: list[WeightedPrompt],
    size: tuple[int, int],
    settings: HDiTGuidance,
    seed: int = 0,
    init: torch.Tensor | None = None,
    device: str = "cpu",
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """One image in [0, 1] (1, 3, H, W) and the guidance loss per step;
    `objective=None` samples unguided."""
    check_size(state["config"], size)
    cond, uncond = run_condition(state, clip, texts, settings.use_cond, device)
    fn = guided(denoiser, settings.cfg, cond, uncond)
    gen = torch.Generator(device=device).manual_seed(seed)
    cut_gen = torch.Generator(device=device).manual_seed(seed + 1)
    sigmas = karras_sigmas(settings.steps, settings.sigma_min, settings.sigma_max, device=device)
    target = None
    if init is not None:
        target = init.to(device) * 2 - 1
        sigmas = sigmas[min(int(settings.steps * settings.init_skip), settings.steps - 1) :]
    noise = torch.randn((1, 3, *size), generator=gen, device=device)
    x = noise * sigmas[0] if target is None else target + noise * sigmas[0]
    losses: list[float] = []
    bar = progress(total=len(sigmas) - 1, desc="guided diffusion", leave=False)

    def model_fn(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if objective is None and not (target is not None and settings.init_weight):
            denoised = fn(x, sigma)
            _step(denoised, None)
            return denoised
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            denoised = fn(x, sigma)
            s = sigma.view(-1, 1, 1, 1)
            fac = s / (1 + s**2).sqrt()  # sqrt(1 - ᾱ) of the variance-preserving view
            x_in = denoised * fac + x / (1 + s**2).sqrt() * (1 - fac)
            loss = (
                tv_loss(x_in).sum() * settings.tv_scale
                + range_loss(denoised).sum() * settings.range_scale
            )
            if objective is not None:
                loss = (
                    loss + objective.loss(x_in.add(1).div(2), cut_gen).sum() * settings.clip_scale
                )
            if (
                target is not None and settings.init_weight
            ):  # relative to the CLIP term, as for the other generators
                loss = (
                    loss
                    + (x_in.add(1).div(2) - target.add(1).div(2)).pow(2).mean()
                    * settings.init_weight
                    / 2
                    * settings.clip_scale
                )
            grad = -torch.autograd.grad(loss, x)[0]
        _step(denoised.detach(), float(loss))
        return denoised.detach() + grad * s**2

    def _step(denoised: torch.Tensor, loss: float | None) -> None:
        if loss is not None:
            losses.append(loss)
            bar.set_postfix(loss=f"{loss:.4f}")
        if on_step is not None:
            on_step(bar.n, denoised.clamp(-1, 1).add(1).div(2))
        bar.update(1)

    out = sample(model_fn, x, sigmas, settings.sampler, generator=gen)
    bar.close()
    return out.clamp(-1, 1).add(1).div(2), losses
