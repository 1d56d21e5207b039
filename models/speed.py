"""Inference speed settings for open_clip models, each measured by `python -m bench.embed`
(bench/results/embed.json, `vitb32`: speed-up over the bare fp32 forward and cosine to fp32).

- `int8`: dynamic int8 quantization of the transformer blocks' Linear layers (`models/int8.py`),
  CPU only, on fbgemm's VNNI kernels.
- `bf16`: weights and activations in bfloat16 where the hardware has bf16 units (CUDA, or
  CPUs with AVX512-BF16/AMX). Casting the weights once beats autocast on CPU, which re-casts
  every weight on every call. Outputs come back as float32. On CPUs it pays only with AMX;
  with AVX512-BF16 alone it ran slower than fp32, and a warning says so.
- `trim_text`: run the text tower only up to the batch's longest caption instead of the full
  77-token context. Exact: under the causal mask no position sees later ones, and the pooled
  token (EOT) lies inside the kept span. Captions are short, so this is the big text win.
- `channels_last`: NHWC memory layout for the image tower's convolutions.
- `compile`: torch.compile the image tower (pays a one-off compile per worker); batches are
  padded to the first batch's size so a shard's short last batch does not recompile. On
  this project's 2-core CPU it did not pay for ViT-B-32 (`fp32_compile` in embed.json).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from open_clip.transformer import text_global_pool

from models.specs import PRECISIONS, int8_device

log = logging.getLogger(__name__)


def bf16_supported(device: Any = "cpu") -> bool:
    """Whether bfloat16 matmuls run natively (not emulated) on `device`."""
    if torch.device(device).type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_has_amx() -> bool | None:
    """Whether this CPU has AMX tiles (None when torch cannot tell).

    Without AMX, AVX512-BF16 alone ran ViT-B-32 in bf16 slower than fp32 (oneDNN converts
    around every op; bench/results/embed.json `bf16`); with AMX bf16 pays.
    """
    probe = getattr(getattr(torch, "cpu", None), "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else None
    except RuntimeError:
        return None


def model_dtype(precision: str, device: Any = "cpu"):
    """torch dtype for a precision name; bf16 falls back to fp32 (with a warning) where emulated.

    int8 keeps fp32 tensors
    (its Linear layers are quantized by `quantize_int8`) and runs on CPU only.
    """
    if precision == "fp32":
        return torch.float32
    if precision == "int8":
        int8_device(device)
        return torch.float32
    if precision == "bf16":
        if bf16_supported(device):
            if torch.device(device).type == "cpu" and cpu_has_amx() is False:
                log.warning(
                    "bf16 on a CPU without AMX: expect it to run slower than fp32 "
                    "(bench/results/embed.json, bf16); --precision fp32 is likely faster"
                )
            return torch.bfloat16
        log.warning("bf16 requested but %s has no native bf16 support; using fp32", device)
        return torch.float32
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def can_trim_text(model: Any) -> bool:
    """True for open_clip's CLIP text tower with a causal mask and EOT/argmax pooling."""
    return (
        all(
            hasattr(model, a)
            for a in (
                "token_embedding",
                "positional_embedding",
                "transformer",
                "ln_final",
                "text_projection",
                "attn_mask",
            )
        )
        and model.attn_mask is not None
        and getattr(model, "text_pool_type", "argmax") in ("argmax", "eos", "last")
    )


def encode_text_trimmed(model: Any, tokens, pad_id: int = 0):
    """`model.encode_text(tokens)` computed on the tokens up to the longest caption in the batch."""
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
