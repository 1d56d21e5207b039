"""One CLIP interface for the whole project: `load_clip(spec, ...)` -> `Clip`.

Specs are parsed in `models.specs` (clip-retrieval's naming; `sieve-tiny` is the offline
default, trained on first use). A `Clip` holds the open_clip model under its speed settings
(`models.speed`: precision fp32 | bf16 | int8, trimmed text context, channels-last, compile)
and is the only thing that turns images or captions into embeddings: the embed job, search,
the server, training and the benchmarks all call it. Every output is an L2-normalised
float32 numpy array.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from models.cache import BUNDLED
from models.int8 import quantize_int8
from models.preprocess import Preprocessor, normalize_
from models.specs import TINY_NAME, bad_spec, check_precision, int8_device, parse_spec
from models.speed import can_trim_text, encode_text_trimmed, model_dtype
from models.tokens import fast_tokenizer

log = logging.getLogger(__name__)


class Clip:
    """A loaded CLIP model under its speed settings.

    `encode_images` (PIL), `encode_texts` (strings), `encode_image_tensor` (a preprocessed
    float NCHW batch, or a uint8 NHWC one that is normalised on the device) and
    `encode_text_tokens` (token ids from `tokenize`); plus `dim`, `spec`, `device`,
    `preprocess`, `tokenizer`, `batch_size` and `precision`.
    """

    def __init__(
        self,
        spec: str,
        model: Any,
        preprocess: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[Sequence[str]], torch.Tensor],
        device: str = "cpu",
        precision: str = "fp32",
        batch_size: int = 256,
        trim_text: bool = True,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        check_precision(precision)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if precision == "int8" and compile:
            raise ValueError("compile is not supported with precision int8")
        self.spec, self.preprocess, self.tokenizer = spec, preprocess, tokenizer
        self.device, self.precision, self.batch_size = str(device), precision, batch_size
        self.channels_last, self.compiled = channels_last, compile
        self.dtype = model_dtype(precision, self.device)
        model = model.to(self.device, self.dtype).eval()
        if precision == "int8":
            model = quantize_int8(model)
        if channels_last:
            model.visual.to(memory_format=torch.channels_last)
        self.model = model
        self.visual = torch.compile(model.visual, dynamic=False) if compile else model.visual
        #: a compiled tower's batch size (its first batch's): smaller batches are padded to it
        self.pad_to: int | None = None
        self.trim_text = trim_text and can_trim_text(model)
        if trim_text and not self.trim_text:
            log.info(
                "text trimming not applicable to %s; using the full context", type(model).__name__
            )
        #: the tokenizer's ids, cheaper per caption (models.tokens)
        self.tokenize = fast_tokenizer(tokenizer)
        self.prep = Preprocessor(preprocess)
        self.dim = int(_embed_dim(model))

    def settings(self) -> dict[str, Any]:
        """The speed settings, as `load_clip` takes them."""
        return {
            "precision": self.precision,
            "trim_text": self.trim_text,
            "channels_last": self.channels_last,
            "compile": self.compiled,
            "batch_size": self.batch_size,
        }

    def variant(self, **changes: Any) -> "Clip":
        """A copy of this fp32 model under other settings
        (the server's int8 or bf16 text tower, say)."""
        if self.precision != "fp32" or self.compiled:
            raise ValueError("variant() copies an fp32, uncompiled Clip")
        settings = {**self.settings(), "device": self.device, **changes}
        return Clip(
            self.spec, copy.deepcopy(self.model), self.preprocess, self.tokenizer, **settings
        )

    # ---- images ------------------------------------------------------------------------------
    def encode_image_tensor(self, batch: torch.Tensor) -> np.ndarray:
        """Embed a preprocessed float (n, 3, H, W) batch, or a uint8
        (n, H, W, 3) one at the model's size.

        A uint8 batch is a quarter of the bytes to move and is normalised on the device with the
        same operations, and so the same values, as `models.preprocess.normalize_batch`.
        """
        out = [
            self._images(batch[i : i + self.batch_size])
            for i in range(0, len(batch), self.batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def _images(self, batch: torch.Tensor) -> np.ndarray:
        if batch.dtype == torch.uint8:
            if self.prep.batched is None:
                raise ValueError(
                    f"{self.spec}: uint8 batches need open_clip's standard preprocess chain"
                )
            x = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().contiguous()
            batch = normalize_(x, *self.prep.batched[1:])
        x = batch.to(self.device, self.dtype, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        n = x.shape[0]
        if self.compiled:
            self.pad_to = self.pad_to or n
            if n < self.pad_to:  # one graph for every batch: a shard's last batch is usually short
                x = torch.cat([x, x.new_zeros((self.pad_to - n,) + tuple(x.shape[1:]))])
        with torch.inference_mode():
            feats = self.visual(x)
            if isinstance(feats, (tuple, list)):
                feats = feats[0]
            return _finish(feats[:n])

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed PIL images -> float32 (n, dim), L2-normalised."""
        out = []
        for i in range(0, len(images), self.batch_size):
            chunk = [
                self.prep.model_input(im.convert("RGB")) for im in images[i : i + self.batch_size]
            ]
            out.append(self.encode_image_tensor(self.prep.stack(chunk)))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    # ---- text --------------------------------------------------------------------------------
    def encode_text_tokens(self, tokens: torch.Tensor) -> np.ndarray:
        """Embed token ids (from `tokenize`) -> float32 (n, dim), L2-normalised."""
        tokens = tokens.to(self.device)
        with torch.inference_mode():
            feats = (
                encode_text_trimmed(self.model, tokens)
                if self.trim_text
                else self.model.encode_text(tokens)
            )
            return _finish(feats)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embed captions -> float32 (n, dim), L2-normalised."""
        out = [
            self.encode_text_tokens(self.tokenize(list(texts[i : i + self.batch_size])))
            for i in range(0, len(texts), self.batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


def _finish(feats: torch.Tensor) -> np.ndarray:
    return F.normalize(feats.float(), dim=-1).cpu().numpy()


def _embed_dim(model: Any) -> int:
    proj = getattr(model, "text_projection", None)
    if proj is not None:
        return proj.shape[-1] if hasattr(proj, "shape") else proj.out_features
    return int(model.visual.output_dim)


def default_device() -> str:
    """cuda when available, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def tiny_dir() -> Path:
    """The sieve-tiny folder in the cache (an open_clip local-dir folder),
    trained first when missing or stale."""
    return BUNDLED[TINY_NAME].ensure()


def _load_open_clip(
    spec: str, arch: str, weights: str, checkpoint: bool, device: str
) -> tuple[Any, Any, Any]:
    if arch not in open_clip.list_models():
        raise bad_spec(
            spec, f"unknown open_clip architecture {arch!r} (see open_clip.list_models())"
        )
    if not weights:
        log.warning(
            "%s: no pretrained tag or checkpoint given, using RANDOM weights (benchmarks only)",
            spec,
        )
        model, _, preprocess = open_clip.create_model_and_transforms(arch, device=device)
    elif checkpoint:
        if not Path(weights).is_file():
            raise FileNotFoundError(
                f"CLIP spec {spec!r}: checkpoint file {weights!r} does not exist"
            )
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=weights, device=device
        )
    else:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if weights not in tags:
            raise bad_spec(spec, f"{arch} has no pretrained tag {weights!r}; known tags: {tags}")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=weights, device=device
            )
        except Exception as exc:  # open_clip wraps every download failure in RuntimeError/OSError
            raise RuntimeError(
                f"CLIP spec {spec!r}: could not get the "
                f"pretrained weights {arch}/{weights} ({exc}). "
                "Weights cannot be downloaded on this machine "
                "(no model hub). Download the checkpoint "
                f"elsewhere and pass it as 'open_clip:{arch}/path/to/checkpoint.pt' or "
                "'local-dir:/path/to/folder', or use the offline default 'sieve-tiny'."
            ) from exc
    return model, preprocess, open_clip.get_tokenizer(arch)


def _load_local_dir(spec: str, folder: str, device: str) -> tuple[Any, Any, Any]:
    path = Path(folder).expanduser()
    if not (path / "open_clip_config.json").is_file():
        raise bad_spec(spec, f"{path} has no open_clip_config.json")
    name = f"local-dir:{path}"
    model, _, preprocess = open_clip.create_model_and_transforms(name, device=device)
    return model, preprocess, open_clip.get_tokenizer(name)


def load_clip(
    spec: str = TINY_NAME,
    device: str | None = None,
    batch_size: int = 256,
    precision: str = "fp32",
    trim_text: bool = True,
    channels_last: bool = False,
    compile: bool = False,
) -> Clip:
    """Load a CLIP model by spec under the given speed settings;
    device defaults to cuda when available.

    int8 quantizes the transformer blocks' Linear layers and runs on the CPU only, so it is also
    the default device then.
    """
    parsed = parse_spec(spec)
    check_precision(precision)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = int8_device(device) if precision == "int8" else device or default_device()
    if parsed.kind == "tiny":
        model, preprocess, tokenizer = _load_local_dir(parsed.text, str(tiny_dir()), "cpu")
    elif parsed.kind == "open_clip":
        model, preprocess, tokenizer = _load_open_clip(
            parsed.text, parsed.arch, parsed.weights, parsed.checkpoint, "cpu"
        )
    else:
        model, preprocess, tokenizer = _load_local_dir(parsed.text, parsed.weights, "cpu")
    # loaded on the CPU in fp32; Clip moves and casts it once, under its precision
    return Clip(
        parsed.text,
        model,
        preprocess,
        tokenizer,
        device=device,
        precision=precision,
        batch_size=batch_size,
        trim_text=trim_text,
        channels_last=channels_last,
        compile=compile,
    )
