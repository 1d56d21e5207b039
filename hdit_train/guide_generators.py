"""What VQGAN-CLIP optimises: a VQGAN latent or a direct pixel parameterisation, and the Adam loop.

`VQGANGenerator` is the reference's: a latent grid initialised from random codebook entries
(or the encoded init image), decoded through straight-through vector quantisation, and clamped
to the codebook's range after every step. `PixelGenerator` needs no weights: the image itself,
as logits (`raw`), as a 1/f-scaled Fourier spectrum (`fourier`, lucid's parameterisation: low
frequencies move first) or as a sum of upsampled grids at several scales (`pyramid`). Both
add the init-weight term (squared distance to where the edit started, on the latent for VQGAN
as the reference, on the pixels here) and go through `optimise`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from hdit_train.guide_loss import ClipObjective, GuidanceError, clamp_with_grad
from models.runtime import progress
from models.vqgan import VQGAN, vector_quantize

PIXEL_PARAMS = ("raw", "fourier", "pyramid")


class VQGANGenerator:
    """A VQGAN latent (1, e_dim, H/f, W/f) that decodes to the image."""

    def __init__(
        self,
        model: VQGAN,
        size: tuple[int, int],
        init: torch.Tensor | None = None,
        init_weight: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        f = model.factor
        if size[0] % f or size[1] % f or min(size) < f:
            raise GuidanceError(
                f"size {size[0]}x{size[1]}: the VQGAN makes sides that are multiples of {f}"
            )
        self.model, self.init_weight = model, init_weight
        codebook = model.codebook
        dev = codebook.device
        th, tw = size[0] // f, size[1] // f
        if init is None:
            tokens = torch.randint(codebook.shape[0], (th * tw,), generator=generator, device=dev)
            z = (
                (F.one_hot(tokens, codebook.shape[0]).float() @ codebook)
                .view(1, th, tw, -1)
                .permute(0, 3, 1, 2)
            )
        else:
            with torch.no_grad():
                z = model.encode(init.to(dev) * 2 - 1)[0]
        self.z = z.detach().clone().requires_grad_(True)
        self.z_orig = self.z.detach().clone()
        self.z_min = codebook.min(0).values.view(1, -1, 1, 1)
        self.z_max = codebook.max(0).values.view(1, -1, 1, 1)

    def parameters(self) -> list[torch.Tensor]:
        return [self.z]

    def image(self) -> torch.Tensor:
        """(1, 3, H, W) in [0, 1], differentiable in the latent (straight-through quantisation)."""
        z_q = vector_quantize(self.z.movedim(1, 3), self.model.codebook).movedim(3, 1)
        return clamp_with_grad(self.model.decode(z_q).add(1).div(2), 0, 1)

    def init_loss(self) -> torch.Tensor | None:
        if not self.init_weight:
            return None
        return F.mse_loss(self.z, self.z_orig) * self.init_weight / 2

    @torch.no_grad()
    def after_step(self) -> None:
        self.z.copy_(self.z.maximum(self.z_min).minimum(self.z_max))


def _logit(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(0.01, 0.99)
    return torch.log(x / (1 - x))


class PixelGenerator:
    """The image as free parameters, through a sigmoid so values stay in (0, 1)."""

    def __init__(
        self,
        size: tuple[int, int],
        param: str = "fourier",
        init: torch.Tensor | None = None,
        init_weight: float = 0.0,
        generator: torch.Generator | None = None,
        device: str = "cpu",
    ) -> None:
        if param not in PIXEL_PARAMS:
            raise GuidanceError(f"pixel parameterisation {param!r}: choose one of {PIXEL_PARAMS}")
        h, w = size
        if min(h, w) < 8:
            raise GuidanceError(f"size {h}x{w}: pixels need sides of at least 8")
        self.size, self.param, self.init_weight = (h, w), param, init_weight
        self.init = None if init is None else init.to(device)
        base = (
            _logit(self.init)
            if self.init is not None
            else 0.5 * torch.randn((1, 3, h, w), generator=generator, device=device)
        )
        if param == "raw":
            self.params = [base.clone().requires_grad_(True)]
        elif param == "fourier":
            fy = torch.fft.fftfreq(h, device=device)[:, None]
            fx = torch.fft.rfftfreq(w, device=device)[None, :]
            self.scale = 1.0 / torch.sqrt(fx**2 + fy**2).clamp(min=1.0 / max(h, w))
            spec = torch.fft.rfft2(base, norm="ortho") / self.scale
            self.params = [torch.view_as_real(spec).contiguous().requires_grad_(True)]
        else:
            self.scales = [s for s in (1, 2, 4, 8) if min(h, w) // s >= 4]
            self.params = [
                (base if s == 1 else torch.zeros((1, 3, h // s, w // s), device=device))
                .clone()
                .requires_grad_(True)
                for s in self.scales
            ]

    def parameters(self) -> list[torch.Tensor]:
        return self.params

    def logits(self) -> torch.Tensor:
        if self.param == "raw":
            return self.params[0]
        if self.param == "fourier":
            spec = torch.view_as_complex(self.params[0]) * self.scale
            return torch.fft.irfft2(spec, s=self.size, norm="ortho")
        return sum(
            p if s == 1 else F.interpolate(p, self.size, mode="bilinear", align_corners=False)
            for s, p in zip(self.scales, self.params)
        )

    def image(self) -> torch.Tensor:
        return torch.sigmoid(self.logits())

    def init_loss(self) -> torch.Tensor | None:
        if not self.init_weight or self.init is None:
            return None
        return F.mse_loss(self.image(), self.init) * self.init_weight / 2

    def after_step(self) -> None:
        """Nothing to clamp: the sigmoid keeps every parameter value a valid image."""


def optimise(
    gen: VQGANGenerator | PixelGenerator,
    objective: ClipObjective,
    steps: int,
    step_size: float,
    generator: torch.Generator | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    desc: str = "guiding",
) -> tuple[torch.Tensor, list[float]]:
    """VQGAN-CLIP's loop: Adam on the generator's parameters against the prompts' loss (plus the
    init-weight term); `on_step(i, image)` sees each step's image. Returns (final image, losses)."""
    opt = torch.optim.Adam(gen.parameters(), lr=step_size)
    losses: list[float] = []
    bar = progress(range(steps), desc=desc, leave=False, disable=not steps)
    for i in bar:
        opt.zero_grad(set_to_none=True)
        image = gen.image()
        loss = objective.loss(image, generator).sum()
        init_term = gen.init_loss()
        if init_term is not None:
            loss = loss + init_term
        if on_step is not None:
            on_step(i, image.detach())
        loss.backward()
        opt.step()
        gen.after_step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    with torch.no_grad():
        final = gen.image().detach()
    if not all(math.isfinite(v) for v in losses):
        raise FloatingPointError(
            "guidance diverged (a loss is not finite); try a smaller --step-size"
        )
    return final, losses
