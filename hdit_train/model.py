"""Hourglass Diffusion Transformer (Crowson et al. 2024), written from the paper.

Pixels → patch tokens → an hourglass of levels (neighborhood attention at high resolution,
global attention at the bottom), with 2×2 token merges going down and token splits with a
learnable lerp skip coming up. Every block is AdaRMSNorm (conditioned by a mapping network
of Fourier-embedded noise level, optional class and optional vector such as a CLIP
embedding) → cosine-similarity attention with axial RoPE → AdaRMSNorm → GEGLU feed-forward;
output projections start at zero so the untrained network is the identity on its residual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hdit_train.neighborhood import na2d


@dataclass
class LevelSpec:
    """One hourglass level: its blocks, width and attention kind."""

    depth: int
    width: int
    d_ff: int
    attn: str = "neighborhood"  # "neighborhood" or "global"
    d_head: int = 64
    kernel_size: int = 7
    dropout: float = 0.0


@dataclass
class MappingSpec:
    """The mapping network that turns noise level / class / vector into the norm conditioning."""

    depth: int = 2
    width: int = 256
    d_ff: int = 768
    dropout: float = 0.0


@dataclass
class HDiTConfig:
    """The whole model: patch size, levels (top → bottom), mapping net, conditioning inputs."""

    levels: list[LevelSpec]
    mapping: MappingSpec = field(default_factory=MappingSpec)
    patch_size: int = 4
    in_channels: int = 3
    num_classes: int = 0  # 0 = no class conditioning; index num_classes is the "no class" slot
    mapping_cond_dim: int = 0  # 0 = none; else e.g. the CLIP embedding size

    @classmethod
    def from_dict(cls, d: dict) -> "HDiTConfig":
        """Build from the plain dict stored in configs and checkpoints."""
        d = dict(d)
        levels = [LevelSpec(**lv) for lv in d.pop("levels")]
        mapping = MappingSpec(**d.pop("mapping", {}))
        return cls(levels=levels, mapping=mapping, **d)


def zero_init(layer: nn.Linear) -> nn.Linear:
    """Zero a projection so the block it closes starts as the identity."""
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMS-normalise the last dim (in float32) and multiply by scale."""
    if x.dtype == torch.float32:  # one fused kernel where available
        return F.rms_norm(x, (x.shape[-1],), eps=eps) * scale
    dtype = torch.promote_types(x.dtype, torch.float32)
    mean_sq = x.to(dtype).pow(2).mean(-1, keepdim=True)
    return (x.to(dtype) * torch.rsqrt(mean_sq + eps) * scale.to(dtype)).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with a learnable per-channel scale."""

    def __init__(self, width: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.scale)


class AdaRMSNorm(nn.Module):
    """RMSNorm whose scale is 1 + a (zero-initialised) linear function of the conditioning."""

    def __init__(self, width: int, cond_width: int):
        super().__init__()
        self.linear = zero_init(nn.Linear(cond_width, width, bias=False))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.linear(cond)[:, None, None, :] + 1)


class GEGLU(nn.Module):
    """Linear to 2·d_ff, then value · GELU(gate)."""

    def __init__(self, d_in: int, d_ff: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d_ff * 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FourierFeatures(nn.Module):
    """Random Fourier features of a scalar (the EDM c_noise)."""

    def __init__(self, out_features: int, std: float = 1.0):
        super().__init__()
        self.register_buffer("weight", torch.randn(out_features // 2, 1) * std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = 2 * math.pi * x[:, None] @ self.weight.T
        return torch.cat([f.cos(), f.sin()], dim=-1)


class AxialRoPE(nn.Module):
    """Rotary position embedding on the first half of each head: half for y, half for x."""

    def __init__(self, d_head: int, n_heads: int):
        super().__init__()
        n_freqs = d_head // 8  # d_head/2 rotated dims → d_head/4 pairs → split over two axes
        log_min, log_max = math.log(math.pi), math.log(10 * math.pi)
        freqs = torch.linspace(log_min, log_max, n_heads * n_freqs * 2).exp()
        self.freqs = nn.Parameter(freqs.view(2, n_freqs, n_heads).permute(2, 0, 1).contiguous())
        self.n_rot = n_freqs * 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., heads, H, W, d_head) → same, rotated by grid position."""
        h, w = x.shape[-3], x.shape[-2]
        side = max(h, w)
        pos_y = (torch.arange(h, device=x.device) + 0.5 - h / 2) / side * 2
        pos_x = (torch.arange(w, device=x.device) + 0.5 - w / 2) / side * 2
        fy = pos_y[None, :, None] * self.freqs[:, 0, None, :].to(x.dtype)  # (heads, H, nf)
        fx = pos_x[None, :, None] * self.freqs[:, 1, None, :].to(x.dtype)  # (heads, W, nf)
        fy = fy[:, :, None, :].expand(-1, h, w, -1)
        fx = fx[:, None, :, :].expand(-1, h, w, -1)
        theta = torch.cat([fy, fx], dim=-1)  # (heads, H, W, n_rot/2)
        x_rot, x_pass = x[..., : self.n_rot], x[..., self.n_rot :]
        x1, x2 = x_rot.chunk(2, dim=-1)
        cos, sin = theta.cos(), theta.sin()
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return torch.cat([rotated, x_pass], dim=-1)


class Attention(nn.Module):
    """Cosine-similarity self-attention (learnable per-head scale) with axial RoPE."""

    def __init__(self, spec: LevelSpec, cond_width: int):
        super().__init__()
        if spec.width % spec.d_head:
            raise ValueError(f"width {spec.width} is not a multiple of d_head {spec.d_head}")
        self.spec = spec
        self.n_heads = spec.width // spec.d_head
        self.norm = AdaRMSNorm(spec.width, cond_width)
        self.qkv = nn.Linear(spec.width, spec.width * 3, bias=False)
        self.scale = nn.Parameter(torch.full([self.n_heads], 10.0))
        self.rope = AxialRoPE(spec.d_head, self.n_heads)
        self.dropout = nn.Dropout(spec.dropout)
        self.out = zero_init(nn.Linear(spec.width, spec.width, bias=False))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(self.norm(x, cond)).view(b, h, w, 3, self.n_heads, self.spec.d_head)
        q, k, v = qkv.permute(3, 0, 4, 1, 2, 5)  # each (B, heads, H, W, d)
        sqrt_scale = self.scale.sqrt()[:, None, None, None].to(q.dtype)
        qk = self.rope(
            F.normalize(qkv[..., :2, :, :].permute(3, 0, 4, 1, 2, 5), dim=-1, eps=1e-6) * sqrt_scale
        )
        q, k = qk[0], qk[1]  # normalised, scaled and rotated together: half the elementwise calls
        if self.spec.attn == "global":
            flat = [t.reshape(b, self.n_heads, h * w, -1) for t in (q, k, v)]
            y = F.scaled_dot_product_attention(*flat, scale=1.0).view(b, self.n_heads, h, w, -1)
        elif self.spec.attn == "neighborhood":
            ks = min(self.spec.kernel_size, h, w)
            y = na2d(q, k, v, ks, scale=1.0)
        else:
            raise ValueError(f"unknown attention kind {self.spec.attn!r} (neighborhood or global)")
        y = y.permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return x + self.out(self.dropout(y))


class FeedForward(nn.Module):
    """AdaRMSNorm → GEGLU → dropout → zero-initialised projection, residual."""

    def __init__(self, spec: LevelSpec, cond_width: int):
        super().__init__()
        self.norm = AdaRMSNorm(spec.width, cond_width)
        self.up = GEGLU(spec.width, spec.d_ff)
        self.dropout = nn.Dropout(spec.dropout)
        self.down = zero_init(nn.Linear(spec.d_ff, spec.width, bias=False))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return x + self.down(self.dropout(self.up(self.norm(x, cond))))


class Block(nn.Module):
    """One transformer block: attention then feed-forward."""

    def __init__(self, spec: LevelSpec, cond_width: int):
        super().__init__()
        self.attn = Attention(spec, cond_width)
        self.ff = FeedForward(spec, cond_width)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.ff(self.attn(x, cond), cond)


class TokenMerge(nn.Module):
    """Merge each p×p group of tokens (or pixels) into one token by a linear map."""

    def __init__(self, d_in: int, d_out: int, patch: int = 2):
        super().__init__()
        self.patch = patch
        self.proj = nn.Linear(d_in * patch * patch, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        p = self.patch
        x = (
            x.view(b, h // p, p, w // p, p, c)
            .permute(0, 1, 3, 2, 4, 5)
            .reshape(b, h // p, w // p, -1)
        )
        return self.proj(x)


class TokenSplit(nn.Module):
    """Split each token into p×p tokens by a linear map; optional learnable lerp with a skip."""

    def __init__(self, d_in: int, d_out: int, patch: int = 2, skip: bool = True):
        super().__init__()
        self.patch = patch
        self.proj = nn.Linear(d_in, d_out * patch * patch, bias=False)
        self.fac = nn.Parameter(torch.tensor(0.5)) if skip else None

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        b, h, w, _ = x.shape
        p = self.patch
        x = (
            self.proj(x)
            .view(b, h, w, p, p, -1)
            .permute(0, 1, 3, 2, 4, 5)
            .reshape(b, h * p, w * p, -1)
        )
        if self.fac is not None and skip is not None:
            x = torch.lerp(skip, x, self.fac.to(x.dtype))
        return x


class MappingNetwork(nn.Module):
    """Pre-norm GEGLU MLP over the summed conditioning embeddings."""

    def __init__(self, spec: MappingSpec):
        super().__init__()
        self.in_norm = RMSNorm(spec.width)
        self.blocks = nn.ModuleList()
        for _ in range(spec.depth):
            self.blocks.append(
                nn.ModuleDict(
                    {
                        "norm": RMSNorm(spec.width),
                        "up": GEGLU(spec.width, spec.d_ff),
                        "down": zero_init(nn.Linear(spec.d_ff, spec.width, bias=False)),
                    }
                )
            )
        self.out_norm = RMSNorm(spec.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_norm(x)
        for blk in self.blocks:
            x = x + blk["down"](blk["up"](blk["norm"](x)))
        return self.out_norm(x)


class HDiT(nn.Module):
    """The hourglass transformer; forward(x, c_noise, class_labels, mapping_cond) → F(x)."""

    def __init__(self, cfg: HDiTConfig):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False
        mw = cfg.mapping.width
        self.patch_in = TokenMerge(cfg.in_channels, cfg.levels[0].width, cfg.patch_size)
        self.time_emb = FourierFeatures(mw)
        self.time_in = nn.Linear(mw, mw, bias=False)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, mw) if cfg.num_classes else None
        self.cond_in = (
            nn.Linear(cfg.mapping_cond_dim, mw, bias=False) if cfg.mapping_cond_dim else None
        )
        self.mapping = MappingNetwork(cfg.mapping)
        *upper, bottom = cfg.levels
        self.down_levels = nn.ModuleList(
            [nn.ModuleList([Block(s, mw) for _ in range(s.depth)]) for s in upper]
        )
        self.mid_level = nn.ModuleList([Block(bottom, mw) for _ in range(bottom.depth)])
        self.up_levels = nn.ModuleList(
            [nn.ModuleList([Block(s, mw) for _ in range(s.depth)]) for s in upper]
        )
        self.merges = nn.ModuleList(
            [TokenMerge(a.width, b.width) for a, b in zip(cfg.levels, cfg.levels[1:])]
        )
        self.splits = nn.ModuleList(
            [TokenSplit(b.width, a.width) for a, b in zip(cfg.levels, cfg.levels[1:])]
        )
        self.out_norm = RMSNorm(cfg.levels[0].width)
        self.patch_out = TokenSplit(
            cfg.levels[0].width, cfg.in_channels, cfg.patch_size, skip=False
        )
        zero_init(self.patch_out.proj)

    def _run(self, blocks: nn.ModuleList, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        for blk in blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(blk, x, cond, use_reentrant=False)
            else:
                x = blk(x, cond)
        return x

    def condition(
        self,
        c_noise: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        mapping_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The mapping network's output for a batch: noise level + class + vector embeddings."""
        emb = self.time_in(self.time_emb(c_noise.float()))
        if self.class_emb is not None:
            if class_labels is None:  # unconditional = the extra "no class" slot
                class_labels = torch.full_like(c_noise, self.cfg.num_classes, dtype=torch.long)
            emb = emb + self.class_emb(class_labels)
        if self.cond_in is not None:
            if mapping_cond is None:
                mapping_cond = c_noise.new_zeros(c_noise.shape[0], self.cfg.mapping_cond_dim)
            emb = emb + self.cond_in(mapping_cond.float())
        return self.mapping(emb)

    def forward(
        self,
        x: torch.Tensor,
        c_noise: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        mapping_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        p = self.cfg.patch_size * 2 ** (len(self.cfg.levels) - 1)
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(
                f"image size {tuple(x.shape[-2:])} must be a multiple of {p} "
                f"(patch {self.cfg.patch_size} × 2^{len(self.cfg.levels) - 1} merges)"
            )
        cond = self.condition(c_noise, class_labels, mapping_cond)
        h = self.patch_in(x.movedim(1, -1))
        skips = []
        for blocks, merge in zip(self.down_levels, self.merges):
            h = self._run(blocks, h, cond)
            skips.append(h)
            h = merge(h)
        h = self._run(self.mid_level, h, cond)
        for blocks, split, skip in reversed(list(zip(self.up_levels, self.splits, skips))):
            h = self._run(blocks, split(h, skip), cond)
        return self.patch_out(self.out_norm(h)).movedim(-1, 1)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay only the matrices of linear layers, not norms, biases, embeddings,
        attention scales, RoPE frequencies or lerp factors."""
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            is_matrix = param.ndim >= 2 and not any(
                s in name for s in ("class_emb", "rope", "time_emb")
            )
            (decay if is_matrix else no_decay).append(param)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
