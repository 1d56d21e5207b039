"""Inference speed settings for open_clip models, each measured by `bench/embed.py`.

- `int8`: dynamic int8 quantization of every Linear layer (`pipelines/int8.py`), CPU only;
  fbgemm's VNNI kernels ran ViT-B-32's image tower 2.1x and its text tower 2.4x faster than
  fp32 on one core here, at cosine 0.9998 / 0.9987 to fp32 (random weights).
- `bf16`: weights and activations in bfloat16 where the hardware has bf16 units (CUDA, or
  CPUs with AVX512-BF16/AMX). Casting the weights once beats autocast on CPU, which re-casts
  every weight on every call. Outputs come back as float32. It pays with AMX (3.6x for
  ViT-B-32); with AVX512-BF16 alone it ran at 0.57x of fp32, and a warning says so.
- `trim_text`: run the text tower only up to the batch's longest caption instead of the full
  77-token context. Exact: under the causal mask no position sees later ones, and the pooled
  token (EOT) lies inside the kept span. Captions are short, so this is the big text win.
- `channels_last`: NHWC memory layout for the image tower's convolutions.
- `compile`: torch.compile the image tower (pays a one-off compile per worker); batches are
  padded to the first batch's size so a shard's short last batch does not recompile. On
  this CPU it did not pay for ViT-B-32 (0.94x of eager; with inductor's weight freezing
  6-11% faster in one process, but 0.92x of plain trim_text in the two-worker job).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

SPEED_OPTIONS = ("channels_last", "compile", "trim_text")
#: `--precision` choices of every command that embeds (pipelines.embed, indices.serve)
PRECISIONS = ("fp32", "bf16", "int8")


def bf16_supported(device: Any = "cpu") -> bool:
    """Whether bfloat16 matmuls run natively (not emulated) on `device`."""
    import torch

    if torch.device(device).type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_has_amx() -> bool | None:
    """Whether this CPU has AMX tiles (None when torch cannot tell).

    Without AMX, AVX512-BF16 alone ran ViT-B-32 in bf16 at 0.57x its fp32 speed here (oneDNN
    converts around every op); with AMX bf16 was 3.6x faster (bench/embed.py).
    """
    import torch

    probe = getattr(getattr(torch, "cpu", None), "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else None
    except RuntimeError:
        return None


def int8_device(device: Any = None) -> str:
    """The device int8 runs on: quantized kernels are CPU ones, so the CPU when none is given;
    any other device is refused."""
    device = str(device or "cpu")
    if not device.startswith("cpu"):
        raise ValueError(f"precision int8 runs on the CPU only, not {device}; use bf16 on a GPU")
    return device


def model_dtype(precision: str, device: Any = "cpu"):
    """torch dtype for a precision name; bf16 falls back to fp32 (with a warning) where emulated.

    int8 keeps fp32 tensors (its Linear layers are quantized by `quantize_int8`) and runs on CPU only.
    """
    import torch

    if precision == "fp32":
        return torch.float32
    if precision == "int8":
        int8_device(device)
        return torch.float32
    if precision == "bf16":
        if bf16_supported(device):
            if torch.device(device).type == "cpu" and cpu_has_amx() is False:
                log.warning("bf16 on a CPU without AMX: expect it to run slower than fp32 "
                            "(measured 0.57x for ViT-B-32); --precision fp32 is likely faster")
            return torch.bfloat16
        log.warning("bf16 requested but %s has no native bf16 support; using fp32", device)
        return torch.float32
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def can_trim_text(model: Any) -> bool:
    """True for open_clip's CLIP text tower with a causal mask and EOT/argmax pooling."""
    return (all(hasattr(model, a) for a in ("token_embedding", "positional_embedding", "transformer",
                                             "ln_final", "text_projection", "attn_mask"))
            and model.attn_mask is not None
            and getattr(model, "text_pool_type", "argmax") in ("argmax", "eos", "last"))


def encode_text_trimmed(model: Any, tokens, pad_id: int = 0):
    """`model.encode_text(tokens)` computed on the tokens up to the longest caption in the batch."""
    import torch
    from open_clip.transformer import text_global_pool

    pool = getattr(model, "text_pool_type", "argmax")
    length = int((tokens != pad_id).sum(1).max().item()) if pool != "last" else tokens.shape[1]
    length = max(1, length)
    tokens = tokens[:, :length]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:length].to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, pool, eos_token_id=getattr(model, "text_eos_id", None))
    if isinstance(model.text_projection, torch.nn.Linear):
        return model.text_projection(x)
    return x @ model.text_projection if model.text_projection is not None else x


class FastClip:
    """Image/text encoding of an open_clip model under the chosen speed settings.

    `encode_image(batch)` takes preprocessed float images (or uint8 ones with their
    normalisation), `encode_text(tokens)` token ids;
    both return L2-normalised float32 tensors on the CPU.
    """

    def __init__(self, model: Any, device: Any = "cpu", precision: str = "fp32",
                 channels_last: bool = False, compile: bool = False, trim_text: bool = True):
        import torch

        self.device = torch.device(device)
        self.dtype = model_dtype(precision, self.device)
        self.model = model.to(self.device, self.dtype).eval()
        if precision == "int8":
            if compile:
                raise ValueError("compile is not supported with precision int8")
            from pipelines.int8 import quantize_int8

            self.model = quantize_int8(self.model)
        self.channels_last = channels_last
        if channels_last:
            self.model.visual.to(memory_format=torch.channels_last)
        self.visual = torch.compile(self.model.visual, dynamic=False) if compile else self.model.visual
        #: a compiled tower's batch size (its first batch's): smaller batches are padded to it
        self.pad_to: int | None = None
        self.compiled = compile
        self.trim_text = trim_text and can_trim_text(self.model)
        if trim_text and not self.trim_text:
            log.info("text trimming not applicable to %s; using the full context", type(model).__name__)

    def encode_image(self, images, normalize: tuple | None = None):
        """Embed a float NCHW batch, or with `normalize=(mean, std)` a uint8 NHWC one.

        The uint8 batch is a quarter of the bytes to move and is scaled on the device, with
        the same operations (and so the same values) as `pipelines.decode.normalize_batch`.
        """
        import torch
        import torch.nn.functional as F

        if normalize is not None:
            mean, std = (torch.tensor(v, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
                         for v in normalize)
            x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().contiguous()
            images = x.div_(255).sub_(mean).div_(std)
        x = images.to(self.device, self.dtype, non_blocking=True)
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
            return F.normalize(feats[:n].float(), dim=-1).cpu()

    def encode_text(self, tokens):
        import torch
        import torch.nn.functional as F

        tokens = tokens.to(self.device)
        with torch.inference_mode():
            feats = encode_text_trimmed(self.model, tokens) if self.trim_text else self.model.encode_text(tokens)
            return F.normalize(feats.float(), dim=-1).cpu()
