"""CLIP image preprocessing a batch at a time, with open_clip's exact values.

open_clip's transform is resize → centre crop → to-tensor → normalise, per image. For an
RGB image already at the model's size the first two are identities and the last two are one
tensor op over a whole batch (`normalize_batch`); an image of another size is resized and
cropped by PIL (`resize_crop`) and then joins the batch as uint8. The result equals the
per-image chain (tests/test_embed_preprocess.py) without torchvision's per-image tensor work.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from PIL import Image


def batch_normalizer(preprocess: Any) -> tuple[int, tuple[float, ...], tuple[float, ...]] | None:
    """(size, mean, std) when `preprocess` is open_clip's
    resize/crop/to-tensor/normalize chain, else None."""
    names = [type(t).__name__ for t in getattr(preprocess, "transforms", [])]
    expected = ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    kept = [n for n in names if n not in ("MaybeConvertMode", "_convert_to_rgb", "function")]
    kept = ["ToTensor" if n == "MaybeToTensor" else n for n in kept]
    if kept != expected:
        return None
    resize, crop, norm = (
        preprocess.transforms[0],
        preprocess.transforms[1],
        preprocess.transforms[-1],
    )
    size = resize.size if isinstance(resize.size, int) else None
    if isinstance(resize.size, (list, tuple)) and len(resize.size) == 1:
        size = resize.size[0]
    if size is None or tuple(crop.size) != (size, size) or getattr(resize, "max_size", None):
        return None
    return size, tuple(float(m) for m in norm.mean), tuple(float(s) for s in norm.std)


def resize_crop(preprocess: Any) -> Callable[[Image.Image], Image.Image] | None:
    """The chain's Resize then CenterCrop as one PIL -> PIL callable,
    when `batch_normalizer` takes the chain."""
    if batch_normalizer(preprocess) is None:
        return None
    steps = {type(t).__name__: t for t in preprocess.transforms}
    resize, crop = steps["Resize"], steps["CenterCrop"]
    return lambda img: crop(resize(img))


def fits(img: Any, size: int) -> bool:
    """Whether `img` (an RGB HWC array or a PIL image) can take the
    batched path: RGB, size x size."""
    if isinstance(img, np.ndarray):
        return img.shape == (size, size, 3)
    return img.mode == "RGB" and img.size == (size, size)


def normalize_batch(
    arrays: list[np.ndarray], mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """Stacked HWC uint8 arrays -> NCHW float32, the same values as ToTensor + Normalize."""
    hwc = torch.from_numpy(np.stack(arrays))
    n, h, w, c = hwc.shape
    batch = torch.empty((n, c, h, w), dtype=torch.float32)
    batch.copy_(hwc.permute(0, 3, 1, 2))  # layout and dtype in one pass, no uint8 NCHW copy
    return normalize_(batch, mean, std)


def normalize_(
    batch: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """In place on a float NCHW batch of 0-255 values: /255, - mean,
    / std (ToTensor + Normalize)."""
    m = torch.tensor(mean, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
    return batch.div_(255).sub_(m).div_(s)


class Preprocessor:
    """A CLIP preprocess chain applied image by image but batched where the values allow it."""

    def __init__(self, preprocess: Callable[[Image.Image], torch.Tensor]) -> None:
        self.preprocess = preprocess
        #: (size, mean, std) when images at the model's size can skip per-image torchvision
        self.batched = batch_normalizer(preprocess)
        self.resize_crop = resize_crop(preprocess)

    def model_input(self, pixels: np.ndarray | Image.Image) -> np.ndarray | torch.Tensor:
        """An RGB uint8 HWC array the batched normaliser takes,
        else the chain's CHW float tensor."""
        if self.batched is not None:
            if isinstance(pixels, np.ndarray) and fits(pixels, self.batched[0]):
                return pixels
            image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels, "RGB")
            if image.mode == "RGB" and self.resize_crop is not None:
                resized = np.asarray(self.resize_crop(image))
                if fits(resized, self.batched[0]):
                    return resized
            return self.preprocess(image)
        return self.preprocess(
            pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels, "RGB")
        )

    def stack(
        self, items: list[np.ndarray | torch.Tensor], keep_uint8: bool = False
    ) -> torch.Tensor:
        """One batch from `model_input` results: NCHW float; with `keep_uint8` and all arrays, NHWC
        uint8 (for a device to normalise itself)."""
        arrays = [i for i, x in enumerate(items) if isinstance(x, np.ndarray)]
        if keep_uint8 and len(arrays) == len(items):
            return torch.from_numpy(np.stack(items))
        if not arrays:
            return torch.stack(items)
        fast = normalize_batch([items[i] for i in arrays], self.batched[1], self.batched[2])
        if len(arrays) == len(items):
            return fast
        out = list(items)
        for j, i in enumerate(arrays):
            out[i] = fast[j]
        return torch.stack(out)
