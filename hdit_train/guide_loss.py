"""CLIP guidance as VQGAN-CLIP defines it
(nerdyrodent/VQGAN-CLIP `generate.py`, after Crowson's notebook).

The pieces every generator shares: weighted text and image prompts (`models.prompts` syntax,
`text:weight:stop`), cutouts of the image with augmentations (`cutn`, `cut_pow`), and the
spherical-distance loss between each cutout's CLIP embedding and each prompt's, with
negative weights pushing away and `stop` ending a prompt's pull once its loss falls below it.
`ClipObjective` holds them; the generators (`hdit_train.guide_generators`) and guided diffusion
(`hdit_train.guide_diffusion`) differentiate through it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import nn

from models.clip import Clip
from models.preprocess import batch_normalizer
from models.prompts import PromptError, WeightedPrompt, parse_prompts
from models.vqgan import replace_grad

#: open_clip's default normalisation, for a CLIP whose preprocess chain is not the standard one
_OPENAI_MEAN, _OPENAI_STD = (
    (0.48145466, 0.4578275, 0.40821073),
    (0.26862954, 0.26130258, 0.27577711),
)


class GuidanceError(ValueError):
    """Input guidance cannot use (an unreadable image, a prompt with no text, a size too small)."""


# ---- losses -------------------------------------------------------------------------------------
def spherical_dist_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared great-circle distance between the normalised x and y
    (broadcast over leading dims)."""
    x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    return (x - y).norm(dim=-1).div(2).arcsin().pow(2).mul(2)


def tv_loss(x: torch.Tensor) -> torch.Tensor:
    """Total variation per image
    (L2 form, as the CLIP-guided diffusion reference): smooth images score low."""
    x = F.pad(x, (0, 1, 0, 1), "replicate")
    dx, dy = x[..., :-1, 1:] - x[..., :-1, :-1], x[..., 1:, :-1] - x[..., :-1, :-1]
    return (dx**2 + dy**2).mean([1, 2, 3])


def range_loss(x: torch.Tensor) -> torch.Tensor:
    """Per image: how far pixel values (in [-1, 1] space) stray outside the range."""
    return (x - x.clamp(-1, 1)).pow(2).mean([1, 2, 3])


class _ClampWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        ctx.lo, ctx.hi = lo, hi
        ctx.save_for_backward(x)
        return x.clamp(lo, hi)

    @staticmethod
    def backward(ctx: Any, grad_in: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (x,) = ctx.saved_tensors
        return grad_in * (grad_in * (x - x.clamp(ctx.lo, ctx.hi)) >= 0), None, None


def clamp_with_grad(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Clamp, but let gradients through wherever they would move an
    out-of-range value back in range."""
    return _ClampWithGrad.apply(x, lo, hi)


class Prompt(nn.Module):
    """One prompt's target embeddings with its weight and stop (VQGAN-CLIP's `Prompt`)."""

    def __init__(self, embed: torch.Tensor, weight: float = 1.0, stop: float = -math.inf) -> None:
        super().__init__()
        self.register_buffer("embed", embed)
        self.register_buffer("weight", torch.as_tensor(weight, dtype=torch.float32))
        self.register_buffer("stop", torch.as_tensor(stop, dtype=torch.float32))

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Loss per image for (cutn, n, dim) cutout embeddings -> (n,)."""
        dists = spherical_dist_loss(
            image_embeds.unsqueeze(2), self.embed.view(1, 1, -1, self.embed.shape[-1])
        )
        dists = dists * self.weight.sign()
        # below `stop` the loss is flat: the gradient stops there, the value does not
        return self.weight.abs() * replace_grad(dists, torch.maximum(dists, self.stop)).mean([0, 2])


# ---- cutouts ------------------------------------------------------------------------------------
class MakeCutouts(nn.Module):
    """`cutn` random square cutouts per image, sizes drawn as rand**cut_pow between the CLIP input
    size and the image's short side, resampled to `cut_size`, then augmented (flip, affine, colour
    jitter, erasing, noise; VQGAN-CLIP's default augment list) so CLIP sees the image, not one
    adversarial rendering of it."""

    def __init__(
        self,
        cut_size: int,
        cutn: int,
        cut_pow: float = 1.0,
        augment: bool = True,
        noise_fac: float = 0.1,
    ) -> None:
        super().__init__()
        self.cut_size, self.cutn, self.cut_pow = cut_size, cutn, cut_pow
        self.augment, self.noise_fac = augment, noise_fac

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(n, 3, H, W) in [0, 1] -> (cutn * n, 3, cut, cut), cutout-major
        (cut 0 of every image first)."""
        n, _, h, w = images.shape
        max_size, min_size = min(h, w), min(h, w, self.cut_size)
        g = {"generator": generator, "device": images.device}
        cutouts = []
        for _ in range(self.cutn):
            size = int(
                float(torch.rand([], **g)) ** self.cut_pow * (max_size - min_size) + min_size
            )
            oy = int(torch.randint(0, h - size + 1, (), **g))
            ox = int(torch.randint(0, w - size + 1, (), **g))
            cut = images[:, :, oy : oy + size, ox : ox + size]
            cutouts.append(
                F.interpolate(
                    cut,
                    (self.cut_size, self.cut_size),
                    mode="bilinear",
                    align_corners=False,
                    antialias=size > self.cut_size,
                )
            )
        batch = torch.cat(cutouts)
        if self.augment:
            batch = _augment(batch, generator)
        if self.noise_fac:
            facs = torch.rand((len(batch), 1, 1, 1), **g) * self.noise_fac
            batch = batch + facs * torch.randn(batch.shape, **g)
        return clamp_with_grad(batch, 0, 1)


def _augment(x: torch.Tensor, generator: torch.Generator | None, p: float = 0.7) -> torch.Tensor:
    """Random flips, affine (±15°, 10% shift, ±5° shear), hue/saturation
    jitter and erasing, per cutout."""
    n, dev = len(x), x.device
    g = {"generator": generator, "device": dev}
    flip = torch.rand(n, **g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    on = (torch.rand(n, **g) < p).float()
    angle = (torch.rand(n, **g) * 2 - 1) * math.radians(15) * on
    shear = (torch.rand(n, **g) * 2 - 1) * math.radians(5) * on
    shift = (torch.rand(n, 2, **g) * 2 - 1) * 0.2 * on[:, None]  # 10% of the side, in [-1, 1] units
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [
            torch.stack([cos, -sin + torch.tan(shear), shift[:, 0]], 1),
            torch.stack([sin, cos, shift[:, 1]], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    jitter = (torch.rand(n, **g) < p).float()[:, None, None, None]
    grey = x.mean(1, keepdim=True)
    sat = 1 + (torch.rand(n, 1, 1, 1, **g) * 2 - 1) * 0.1 * jitter
    x = grey + (x - grey) * sat
    # a small rotation of the chroma plane
    hue = (torch.rand(n, 1, 1, 1, **g) * 2 - 1) * 0.1 * jitter
    x = (
        grey
        + (x - grey) * torch.cos(hue * 2 * math.pi)
        + _chroma_turn(x - grey) * torch.sin(hue * 2 * math.pi)
    )
    erase = torch.rand(n, **g) < p
    h, w = x.shape[-2:]
    frac = torch.rand(n, **g) * 0.3 + 0.1
    eh, ew = (frac.sqrt() * h).long().clamp(1, h), (frac.sqrt() * w).long().clamp(1, w)
    ys = (torch.rand(n, **g) * (h - eh + 1).float()).long()
    xs = (torch.rand(n, **g) * (w - ew + 1).float()).long()
    rows, cols = (
        torch.arange(h, device=dev)[None, :, None],
        torch.arange(w, device=dev)[None, None, :],
    )
    box = (
        (rows >= ys[:, None, None])
        & (rows < (ys + eh)[:, None, None])
        & (cols >= xs[:, None, None])
        & (cols < (xs + ew)[:, None, None])
        & erase[:, None, None]
    )
    return x * ~box[:, None]


def _chroma_turn(c: torch.Tensor) -> torch.Tensor:
    """The chroma vector rotated 90° about the grey axis (cross product with (1, 1, 1)/√3)."""
    r, g, b = c.unbind(1)
    return torch.stack([g - b, b - r, r - g], 1) / math.sqrt(3)


# ---- prompts and the objective -------------------------------------------------------------------
def load_image(path: str | Path) -> Image.Image:
    """An RGB image from a file; GuidanceError naming the file when it cannot be read."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise GuidanceError(f"image {path}: no such file") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise GuidanceError(f"image {path}: cannot be read as an image ({exc})") from None


def to_tensor(img: Image.Image, size: tuple[int, int] | None = None) -> torch.Tensor:
    """A PIL image as (1, 3, H, W) floats in [0, 1], resized (Lanczos) to (h, w) when given."""
    if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.LANCZOS)
    return torch.from_numpy(np.asarray(img, np.float32) / 255).permute(2, 0, 1)[None].contiguous()


def parse_guidance_prompts(
    prompts: str | Sequence[str] | None, image_prompts: str | Sequence[str] | None
) -> tuple[list[WeightedPrompt], list[WeightedPrompt]]:
    """(text prompts, image prompts) in the one weighted-prompt syntax; image prompts name files.

    At least one prompt of either kind must pull (a positive weight): a goal made only of what
    to avoid has no direction.
    """
    texts = parse_prompts(prompts, require_positive=False) if prompts else []
    images = parse_prompts(image_prompts, require_positive=False) if image_prompts else []
    if not texts and not images:
        raise PromptError(
            "no prompt: give --prompts 'a red star' (and/or --image-prompts a.png:0.5)"
        )
    if not any(p.weight > 0 for p in texts + images):
        raise PromptError("prompts: at least one needs a positive weight")
    return texts, images


@dataclass
class ClipObjective:
    """The guidance loss of images in [0, 1] against weighted text and image prompts, through CLIP.

    `loss(images)` is per image (cutouts averaged, prompts summed); `similarity(images)` is the
    plain cosine to the positive prompts' combined embedding, on the whole image, for reporting.
    """

    clip: Clip
    prompts: list[Prompt]
    make_cutouts: MakeCutouts
    mean: torch.Tensor
    std: torch.Tensor
    target: torch.Tensor

    @classmethod
    def build(
        cls,
        clip: Clip,
        texts: Sequence[WeightedPrompt],
        images: Sequence[WeightedPrompt] = (),
        cutn: int = 16,
        cut_pow: float = 1.0,
        augment: bool = True,
        generator: torch.Generator | None = None,
    ) -> "ClipObjective":
        model = clip.model
        model.requires_grad_(False)
        visual_size = model.visual.image_size
        cut_size = int(visual_size[0] if isinstance(visual_size, (tuple, list)) else visual_size)
        norm = batch_normalizer(clip.preprocess)
        mean, std = (norm[1], norm[2]) if norm else (_OPENAI_MEAN, _OPENAI_STD)
        dev = clip.device
        obj = cls(
            clip,
            [],
            MakeCutouts(cut_size, cutn, cut_pow, augment),
            torch.tensor(mean, device=dev).view(1, 3, 1, 1),
            torch.tensor(std, device=dev).view(1, 3, 1, 1),
            torch.zeros(0),
        )
        pulls = []
        if texts:
            embeds = torch.from_numpy(clip.encode_texts([p.text for p in texts])).to(dev)
            for p, e in zip(texts, embeds):
                obj.prompts.append(Prompt(e[None], p.weight, p.stop))
                pulls.append(e * p.weight)
        for p in images:
            img = to_tensor(load_image(p.text)).to(dev)
            with torch.no_grad():
                e = obj.embed(img, generator=generator)[:, 0]
            # every cutout's embedding, as the reference
            obj.prompts.append(Prompt(e, p.weight, p.stop))
            pulls.append(F.normalize(e.mean(0), dim=-1) * p.weight)
        target = torch.stack(pulls).sum(0)
        obj.target = F.normalize(target, dim=-1)
        return obj

    def embed(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(cutn, n, dim) CLIP embeddings of augmented cutouts of images in [0, 1]
        (n, 3, H, W), differentiable."""
        cuts = self.make_cutouts(images, generator)
        feats = self.clip.model.encode_image((cuts - self.mean) / self.std).float()
        return feats.view(self.make_cutouts.cutn, len(images), -1)

    def loss(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-image guidance loss (n,): the weighted prompts' losses summed."""
        embeds = self.embed(images, generator)
        return torch.stack([p(embeds) for p in self.prompts]).sum(0)

    @torch.no_grad()
    def similarity(self, images: torch.Tensor) -> torch.Tensor:
        """Cosine of each whole image's CLIP embedding to the combined prompt target (n,)."""
        size = self.make_cutouts.cut_size
        x = F.interpolate(
            images.clamp(0, 1),
            (size, size),
            mode="bilinear",
            align_corners=False,
            antialias=images.shape[-1] > size,
        )
        feats = F.normalize(
            self.clip.model.encode_image((x - self.mean) / self.std).float(), dim=-1
        )
        return feats @ self.target
