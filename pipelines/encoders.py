"""One CLIP interface for the whole project: `load_clip(spec)` -> `ClipEncoder`.

Specs (clip-retrieval's naming):
  open_clip:ARCH/PRETRAINED_TAG   real open_clip weights (needs a model hub; fails clearly offline)
  open_clip:ARCH/path/to/ckpt.pt  open_clip architecture + a local checkpoint file
  open_clip:ARCH                  random init (speed benchmarks only)
  local-dir:/path                 folder with open_clip_config.json + weights (open_clip's own format)
  sieve-tiny                      the project's offline CLIP, trained on first use into cache_dir()
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from pipelines.clip_speed import PRECISIONS, int8_device

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

TINY_NAME = "sieve-tiny"
ACCEPTED = (
    "'open_clip:ARCH/PRETRAINED_TAG' (e.g. open_clip:ViT-B-32/laion2b_s34b_b79k), "
    "'open_clip:ARCH/path/to/checkpoint.pt', 'open_clip:ARCH' (random init), "
    "'local-dir:/path/to/folder' (open_clip_config.json + weights), 'sieve-tiny'"
)


@dataclass
class ClipEncoder:
    """A loaded CLIP model with batching, device placement and L2-normalised float32 output."""

    spec: str
    model: Any
    preprocess: Callable[["Image.Image"], "torch.Tensor"]
    tokenizer: Callable[[Sequence[str]], "torch.Tensor"]
    device: str
    batch_size: int = 256
    precision: str = "fp32"
    dim: int = field(init=False)

    def __post_init__(self) -> None:
        self.model.eval()
        self.dim = int(self._embed_dim())

    def _embed_dim(self) -> int:
        proj = getattr(self.model, "text_projection", None)
        if proj is not None:
            return proj.shape[-1] if hasattr(proj, "shape") else proj.out_features
        return int(self.model.visual.output_dim)

    def _autocast(self):
        import contextlib

        import torch

        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.split(":")[0], dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _finish(self, feats: "torch.Tensor") -> np.ndarray:
        import torch

        feats = torch.nn.functional.normalize(feats.float(), dim=-1)
        return feats.cpu().numpy().astype(np.float32, copy=False)

    def encode_image_tensor(self, batch: "torch.Tensor") -> np.ndarray:
        """Embed an already-preprocessed (n, 3, H, W) float batch (e.g. built in data workers)."""
        import torch

        out = []
        with torch.inference_mode(), self._autocast():
            for i in range(0, len(batch), self.batch_size):
                chunk = batch[i:i + self.batch_size].to(self.device, non_blocking=True)
                out.append(self._finish(self.model.encode_image(chunk)))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def encode_images(self, images: Sequence["Image.Image"]) -> np.ndarray:
        """Embed PIL images -> float32 (n, dim), L2-normalised."""
        import torch

        out = []
        for i in range(0, len(images), self.batch_size):
            chunk = images[i:i + self.batch_size]
            out.append(self.encode_image_tensor(torch.stack([self.preprocess(im.convert("RGB")) for im in chunk])))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embed captions -> float32 (n, dim), L2-normalised."""
        import torch

        out = []
        with torch.inference_mode(), self._autocast():
            for i in range(0, len(texts), self.batch_size):
                tokens = self.tokenizer(list(texts[i:i + self.batch_size])).to(self.device)
                out.append(self._finish(self.model.encode_text(tokens)))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


def _bad_spec(spec: str, why: str) -> ValueError:
    return ValueError(f"bad CLIP spec {spec!r}: {why}. Accepted forms: {ACCEPTED}")


def default_device() -> str:
    """cuda when available, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def tiny_dir() -> Path:
    """Where `sieve-tiny` lives: cache_dir()/sieve-tiny (an open_clip local-dir folder)."""
    from pipelines.cache import cache_dir

    return cache_dir() / TINY_NAME


def _tiny_ready(folder: Path) -> bool:
    """True when folder holds a complete sieve-tiny trained with the current default recipe."""
    import json

    from pipelines.train_clip import recipe

    info = folder / "train_info.json"
    if not (info.is_file() and (folder / "open_clip_model.safetensors").is_file()):
        return False
    if json.loads(info.read_text()).get("recipe") != json.loads(json.dumps(recipe())):
        log.warning("sieve-tiny in %s was trained with an older recipe: retraining", folder)
        return False
    return True


def ensure_tiny() -> Path:
    """Return the sieve-tiny folder, training it first (under a file lock) when missing or stale."""
    from pipelines.cache import build_once

    folder = tiny_dir()

    def build() -> None:
        from pipelines.train_clip import train_clip

        log.warning("sieve-tiny not found in %s: training it now (a few minutes on 2 cores)", folder)
        train_clip(out=folder)

    build_once(lambda: _tiny_ready(folder), build, folder.parent / f"{TINY_NAME}.lock")
    return folder


def _load_open_clip(spec: str, rest: str, device: str) -> tuple[Any, Any, Any]:
    import open_clip

    arch, _, tail = rest.partition("/")
    if not arch:
        raise _bad_spec(spec, "no architecture after 'open_clip:'")
    if arch not in open_clip.list_models():
        raise _bad_spec(spec, f"unknown open_clip architecture {arch!r} (see open_clip.list_models())")
    if not tail:
        log.warning("%s: no pretrained tag or checkpoint given, using RANDOM weights (benchmarks only)", spec)
        model, _, preprocess = open_clip.create_model_and_transforms(arch, device=device)
    elif "/" in tail or os.path.splitext(tail)[1] in (".pt", ".pth", ".bin", ".safetensors") or os.path.exists(tail):
        if not os.path.isfile(tail):
            raise FileNotFoundError(f"CLIP spec {spec!r}: checkpoint file {tail!r} does not exist")
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=tail, device=device)
    else:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if tail not in tags:
            raise _bad_spec(spec, f"{arch} has no pretrained tag {tail!r}; known tags: {tags}")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=tail, device=device)
        except Exception as exc:  # open_clip wraps every download failure in RuntimeError/OSError
            raise RuntimeError(
                f"CLIP spec {spec!r}: could not get the pretrained weights {arch}/{tail} ({exc}). "
                "Weights cannot be downloaded on this machine (no model hub). Download the checkpoint "
                f"elsewhere and pass it as 'open_clip:{arch}/path/to/checkpoint.pt' or "
                "'local-dir:/path/to/folder', or use the offline default 'sieve-tiny'."
            ) from exc
    return model, preprocess, open_clip.get_tokenizer(arch)


def _load_local_dir(spec: str, folder: str, device: str) -> tuple[Any, Any, Any]:
    import open_clip

    path = Path(folder).expanduser()
    if not (path / "open_clip_config.json").is_file():
        raise _bad_spec(spec, f"{path} has no open_clip_config.json")
    name = f"local-dir:{path}"
    model, _, preprocess = open_clip.create_model_and_transforms(name, device=device)
    return model, preprocess, open_clip.get_tokenizer(name)


def load_clip(spec: str = TINY_NAME, device: str | None = None, batch_size: int = 256,
              precision: str = "fp32") -> ClipEncoder:
    """Load a CLIP model by spec (see module doc); device defaults to cuda when available.

    precision bf16 runs under autocast; int8 quantizes the Linear layers (CPU only, so it is
    also the default device then).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise _bad_spec(str(spec), "empty spec")
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} not supported; use one of {PRECISIONS}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    spec = spec.strip()
    device = int8_device(device) if precision == "int8" else device or default_device()
    if spec == TINY_NAME:
        model, preprocess, tokenizer = _load_local_dir(spec, str(ensure_tiny()), device)
    elif spec.startswith("open_clip:"):
        model, preprocess, tokenizer = _load_open_clip(spec, spec[len("open_clip:"):], device)
    elif spec.startswith("local-dir:"):
        folder = spec[len("local-dir:"):]
        if not folder:
            raise _bad_spec(spec, "no folder after 'local-dir:'")
        model, preprocess, tokenizer = _load_local_dir(spec, folder, device)
    else:
        raise _bad_spec(spec, "unknown scheme")
    if precision == "int8":
        from pipelines.int8 import quantize_int8

        model = quantize_int8(model)
    return ClipEncoder(spec=spec, model=model, preprocess=preprocess, tokenizer=tokenizer,
                       device=device, batch_size=batch_size, precision=precision)
