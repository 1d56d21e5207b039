"""The work behind `python -m hdit_train.guide`: CLIP and a generator loaded once, then one guided
image per seed (`Guide.run`), with intermediate frames and a grid of several seeds.

Generators: `vqgan` (a taming VQGAN: the user's model.yaml + last.ckpt, or the bundled
`sieve-vqgan`), `pixels` (no weights) and `hdit` (CLIP-guided diffusion on a trained run).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from collection.storage import write_bytes
from hdit_train.guide_diffusion import HDiTGuidance, clip_guided_sample
from hdit_train.guide_generators import PixelGenerator, VQGANGenerator, optimise
from hdit_train.guide_loss import (
    ClipObjective,
    GuidanceError,
    load_image,
    parse_guidance_prompts,
    to_tensor,
)
from hdit_train.run import load_run
from models.clip import Clip, default_device, load_clip
from models.vqgan import VQGAN, bundled_vqgan, load_vqgan

log = logging.getLogger(__name__)

GENERATORS = ("vqgan", "pixels", "hdit")
#: Adam's step size when none is given: the reference's 0.1 on VQGAN latents;
#: pixels move in logit units
DEFAULT_STEP_SIZE = {"vqgan": 0.1, "pixels": 0.05}


@dataclass
class GuideSettings:
    """How one image is guided; `hdit` holds the diffusion sampler's settings."""

    steps: int = 100
    step_size: float | None = None
    cutn: int = 16
    cut_pow: float = 1.0
    augment: bool = True
    init_weight: float = 0.0
    pixel_param: str = "fourier"
    hdit: HDiTGuidance = field(default_factory=HDiTGuidance)


@dataclass
class GuideResult:
    """One seed's output image in [0, 1] (1, 3, H, W), its loss per step, and its CLIP similarity
    to the prompts' combined embedding under the guiding CLIP."""

    seed: int
    image: torch.Tensor
    losses: list[float]
    similarity: float


class Guide:
    """A generator and a CLIP, loaded once; `run` makes one guided (or unguided) image."""

    def __init__(
        self,
        generator: str = "vqgan",
        clip_model: str | Clip = "sieve-tiny",
        vqgan_config: str | Path | None = None,
        vqgan_ckpt: str | Path | None = None,
        hdit_ckpt: str | Path | None = None,
        device: str | None = None,
    ) -> None:
        if generator not in GENERATORS:
            raise GuidanceError(f"generator {generator!r}: choose one of {GENERATORS}")
        if (vqgan_config is None) != (vqgan_ckpt is None):
            raise GuidanceError(
                "give both --vqgan-config and --vqgan-ckpt "
                "(or neither, for the bundled sieve-vqgan)"
            )
        if generator == "hdit" and hdit_ckpt is None:
            raise GuidanceError(
                "generator hdit needs --hdit-ckpt RUN (a hdit_train.train run folder)"
            )
        self.generator, self.device = generator, device or default_device()
        self.clip = (
            clip_model
            if isinstance(clip_model, Clip)
            else load_clip(clip_model, device=self.device)
        )
        self.vqgan: VQGAN | None = None
        self.denoiser, self.state = None, None
        if generator == "vqgan":
            if vqgan_config is None:
                vqgan_config, vqgan_ckpt = bundled_vqgan()
            self.vqgan = load_vqgan(vqgan_config, vqgan_ckpt, self.device)
        elif generator == "hdit":
            self.denoiser, self.state = load_run(hdit_ckpt, self.device)
            self.denoiser.requires_grad_(False)

    def default_size(self) -> tuple[int, int]:
        """The run's training size for hdit, else 64 (sieve-tiny's input size)."""
        if self.state is not None:
            size = self.state["config"]["data"]["size"]
            return (size, size)
        return (64, 64)

    def run(
        self,
        prompts: str | Sequence[str] | None,
        image_prompts: str | Sequence[str] | None = None,
        seed: int = 0,
        size: int | tuple[int, int] | None = None,
        init: str | Path | Image.Image | None = None,
        settings: GuideSettings | None = None,
        guided: bool = True,
        on_step: Callable[[int, torch.Tensor], None] | None = None,
    ) -> GuideResult:
        """One image for `seed`; `guided=False` gives the same seed's
        output without CLIP guidance."""
        settings = settings or GuideSettings()
        hw = (
            self.default_size()
            if size is None
            else (size, size)
            if isinstance(size, int)
            else tuple(size)
        )
        if min(hw) < 1:
            raise GuidanceError(f"size {hw[0]}x{hw[1]}: sides must be positive")
        texts, images = parse_guidance_prompts(prompts, image_prompts)
        objective = ClipObjective.build(
            self.clip,
            texts,
            images,
            settings.cutn,
            settings.cut_pow,
            settings.augment,
            generator=torch.Generator(device=self.device).manual_seed(seed),
        )
        init_t = None
        if init is not None:
            init_t = to_tensor(init if isinstance(init, Image.Image) else load_image(init), hw).to(
                self.device
            )
        gen = torch.Generator(device=self.device).manual_seed(seed)
        if self.generator == "hdit":
            hs = settings.hdit
            if init_t is not None:
                hs = HDiTGuidance(**{**vars(hs), "init_weight": settings.init_weight})
            image, losses = clip_guided_sample(
                self.denoiser,
                self.state,
                self.clip,
                objective if guided else None,
                texts,
                hw,
                hs,
                seed,
                init_t,
                self.device,
                on_step,
            )
        else:
            if self.generator == "vqgan":
                g = VQGANGenerator(self.vqgan, hw, init_t, settings.init_weight, gen)
            else:
                g = PixelGenerator(
                    hw, settings.pixel_param, init_t, settings.init_weight, gen, self.device
                )
            step_size = settings.step_size or DEFAULT_STEP_SIZE[self.generator]
            image, losses = optimise(
                g,
                objective,
                settings.steps if guided else 0,
                step_size,
                gen,
                on_step,
                desc=f"{self.generator} seed {seed}",
            )
        return GuideResult(
            seed, image.cpu(), losses, float(objective.similarity(image.to(self.device))[0])
        )


def png_bytes(image: torch.Tensor) -> bytes:
    """A (1, 3, H, W) or (3, H, W) tensor in [0, 1] as PNG bytes."""
    arr = image.squeeze(0).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def save_png(image: torch.Tensor, path: str | Path) -> Path:
    """Write an image (atomically) and return its path."""
    write_bytes(path, png_bytes(image))
    return Path(path)
