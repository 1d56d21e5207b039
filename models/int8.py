"""`--precision int8`: dynamic int8 quantization of an open_clip model's Linear layers, for CPUs.

Weights are stored as int8 (one scale per output channel); each batch's activations are
quantized on the fly and the matmuls run on fbgemm's int8 kernels (AVX512-VNNI / AVX2), which
do four times the multiply-adds of fp32 FMA per instruction. The patch embedding, the layer
norms, softmax and the final projections stay in fp32.

open_clip's attention is `nn.MultiheadAttention`, whose input projection is a bare parameter
that dynamic quantization cannot reach. Its self-attention blocks are first rebuilt as
`SelfAttention` (two Linear layers around `scaled_dot_product_attention`, numerically the same
module) so that every large matmul is quantized. Measured in `bench/embed.py`.

`torch.ao.quantization` warns that it is deprecated in favour of torchao; it still ships in the
torch we pin (2.14), its fbgemm kernels are what make this pay on CPU, and `int8_supported()`
turns False (with a clear error from `quantize_int8`) should a later torch drop it.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

with warnings.catch_warnings():  # deprecated in favour of torchao, yet shipped by the torch we pin
    warnings.simplefilter("ignore")
    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError:  # a later torch without it: int8_supported() turns False
        per_channel_dynamic_qconfig = quantize_dynamic = None

log = logging.getLogger(__name__)


def int8_supported(device: Any = "cpu") -> bool:
    """Whether dynamic int8 quantization runs on `device` (CPU with an x86/fbgemm engine)."""
    if torch.device(device).type != "cpu" or quantize_dynamic is None:
        return False
    return any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm"))


class SelfAttention(nn.Module):
    """`nn.MultiheadAttention` for self-attention only, with its projections as nn.Linear."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        dim = mha.embed_dim
        self.heads = mha.num_heads
        self.batch_first = mha.batch_first
        self.dropout = mha.dropout
        has_bias = mha.in_proj_bias is not None
        self.in_proj = nn.Linear(dim, 3 * dim, bias=has_bias)
        self.out_proj = nn.Linear(dim, dim, bias=mha.out_proj.bias is not None)
        with torch.no_grad():
            self.in_proj.weight.copy_(mha.in_proj_weight)
            if has_bias:
                self.in_proj.bias.copy_(mha.in_proj_bias)
            self.out_proj.load_state_dict(mha.out_proj.state_dict())

    def forward(
        self,
        query,
        key=None,
        value=None,
        key_padding_mask=None,
        need_weights: bool = False,
        attn_mask=None,
        **kwargs: Any,
    ):
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ValueError("SelfAttention takes one input (query is key is value)")
        if key_padding_mask is not None or need_weights or kwargs:
            raise ValueError(
                "SelfAttention supports neither key_padding_mask nor attention weights"
            )
        x = query if self.batch_first else query.transpose(0, 1)
        n, length, dim = x.shape
        qkv = (
            self.in_proj(x).view(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        )
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = ~attn_mask  # MultiheadAttention: True = masked; SDPA: True = attend
        drop = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(
            qkv[0], qkv[1], qkv[2], attn_mask=attn_mask, dropout_p=drop
        )
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, dim))
        return (out if self.batch_first else out.transpose(0, 1)), None


def split_self_attention(model: Any) -> int:
    """Rebuild each open_clip self-attention block's MultiheadAttention as `SelfAttention`.

    Cross-attention blocks and attentional poolers are left alone. Returns how many were rebuilt.
    """
    count = 0
    for block in model.modules():
        if (
            isinstance(block, ResidualAttentionBlock)
            and not hasattr(block, "ln_1_kv")
            and isinstance(block.attn, nn.MultiheadAttention)
            and block.attn._qkv_same_embed_dim
        ):
            block.attn = SelfAttention(block.attn)
            count += 1
    return count


def quantizable_linears(model: Any) -> list[str]:
    """Names of the Linear layers quantize_int8 converts: the MLPs and rebuilt self-attention
    projections of open_clip's transformer blocks.

    Only these: other open_clip code reads some Linear layers' `.weight` as a tensor (the
    ResNet tower's attention pool, MultiheadAttention's out_proj), which a quantized layer lacks.
    """
    names = []
    for name, block in model.named_modules():
        if not isinstance(block, ResidualAttentionBlock):
            continue
        parts = [("mlp", block.mlp)]
        if isinstance(block.attn, SelfAttention):
            parts.append(("attn", block.attn))
        for part, module in parts:
            prefix = f"{name}.{part}" if name else part
            names += [
                f"{prefix}.{sub}"
                for sub, m in module.named_modules()
                if isinstance(m, nn.Linear) and sub
            ]
    return names


def quantize_int8(model: Any) -> Any:
    """The fp32 CPU model with its transformer blocks' Linear layers dynamically int8-quantized.

    Modifies and returns `model`. Raises ValueError when this torch build has no int8 engine.
    Towers without such blocks (open_clip's ResNets) stay fp32, and a warning says so.
    """
    if not int8_supported("cpu"):
        raise ValueError(
            "int8 needs torch.ao.quantization with an x86/fbgemm engine, which this torch "
            "lacks; use --precision fp32"
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        model = model.float().eval()
        rebuilt = split_self_attention(model)
        names = quantizable_linears(model)
        quantize_dynamic(
            model, {n: per_channel_dynamic_qconfig for n in names}, dtype=torch.qint8, inplace=True
        )
    # open_clip reads its towers' cast dtype from the first block's c_fc.weight, a method once
    # quantized; `int8_original_dtype` is the attribute it checks first (meant for bitsandbytes)
    for module in model.modules():
        mlp = getattr(module, "mlp", None)
        if mlp is not None and hasattr(mlp, "c_fc") and callable(getattr(mlp.c_fc, "weight", None)):
            mlp.c_fc.int8_original_dtype = torch.float32
    for tower in ("visual", "transformer"):
        if hasattr(model, tower) and not any(n.startswith(tower + ".") for n in names):
            log.warning(
                "int8: the %s tower has no transformer blocks to quantize and stays fp32",
                "image" if tower == "visual" else "text",
            )
    log.info(
        "int8: %d attention blocks rebuilt, %d Linear layers quantized per channel",
        rebuilt,
        len(names),
    )
    return model
