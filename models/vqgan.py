"""The taming-transformers VQGAN (Esser et al. 2021): encoder, quantiser,
decoder, in taming's layout.

`load_vqgan(config, ckpt)` reads a user's taming `model.yaml` (`taming.models.vqgan.VQModel`)
and `last.ckpt` (the Lightning checkpoint; only its `state_dict` is used, and the loss and
discriminator's `loss.*` keys are ignored). The modules here are written with taming's exact
parameter names and computation because taming's own VQModel does not import with our pins
(it needs pytorch-lightning < 1.8 through `taming.main`, and building it constructs the
LPIPS loss, which downloads VGG weights). `sieve-vqgan` is the small VQGAN of this
architecture that Sieve trains itself (`models.vqgan_train`, `python -m models.train
sieve-vqgan`); `bundled_vqgan()` gives its pair of files, trained on first use.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from collection.storage import atomic_path
from models.cache import BUNDLED

log = logging.getLogger(__name__)

VQMODEL_TARGET = "taming.models.vqgan.VQModel"
CONFIG_FILE, CKPT_FILE = "model.yaml", "last.ckpt"
#: state_dict prefixes of the training-only parts a Lightning checkpoint also holds
IGNORED_PREFIXES = ("loss.",)
BUNDLED_NAME = "sieve-vqgan"


class VQGANError(ValueError):
    """A VQGAN config or checkpoint that cannot be used; the message names
    the file and the problem."""


# ---- taming's building blocks (same names, same arithmetic) ---------------------------------
def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)  # taming writes x * sigmoid(x): the same function, one fused kernel


class Upsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:  # taming pads (0, 1, 0, 1) by hand: torch's conv has no asymmetric padding
            self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q, k, v = (m(h).reshape(b, c, hh * ww).transpose(1, 2) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / √c) v, as taming's bmm form
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, hh, ww))


def _levels(ch: int, ch_mult: list[int]) -> list[tuple[int, int]]:
    """(channels in, channels out) of each resolution level, taming's `in_ch_mult` rule."""
    mults = [1, *ch_mult]
    return [(ch * mults[i], ch * mults[i + 1]) for i in range(len(ch_mult))]


class Encoder(nn.Module):
    def __init__(
        self,
        *,
        ch: int,
        ch_mult: list[int],
        num_res_blocks: int,
        attn_resolutions: list[int],
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = False,
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        **_: Any,
    ) -> None:
        super().__init__()
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        res = resolution
        self.down = nn.ModuleList()
        for i, (block_in, block_out) in enumerate(_levels(ch, ch_mult)):
            down = nn.Module()
            down.block, down.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                down.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    down.attn.append(AttnBlock(block_in))
            if i != len(ch_mult) - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                res //= 2
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, down in enumerate(self.down):
            for j, block in enumerate(down.block):
                h = block(h)
                if len(down.attn):
                    h = down.attn[j](h)
            if i != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: list[int],
        num_res_blocks: int,
        attn_resolutions: list[int],
        resolution: int,
        z_channels: int,
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        **_: Any,
    ) -> None:
        super().__init__()
        self.num_resolutions = len(ch_mult)
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        ups: list[nn.Module] = []
        for i in reversed(range(len(ch_mult))):
            up = nn.Module()
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i]
            for _ in range(num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    up.attn.append(AttnBlock(block_in))
            if i != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                res *= 2
            ups.insert(0, up)  # taming indexes `up` by level, lowest resolution last
        self.up = nn.ModuleList(ups)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i in reversed(range(self.num_resolutions)):
            up = self.up[i]
            for j, block in enumerate(up.block):
                h = block(h)
                if len(up.attn):
                    h = up.attn[j](h)
            if i != 0:
                h = up.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """taming's VectorQuantizer2 (`quantize.embedding.weight`):
    nearest codebook entry, straight-through."""

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25) -> None:
        super().__init__()
        self.n_e, self.e_dim, self.beta = n_embed, embed_dim, beta
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z_q with z's gradient, codebook + commitment loss (taming's legacy form), indices)."""
        zl = z.movedim(1, -1)
        indices = nearest_code(zl, self.embedding.weight)
        z_q = self.embedding(indices)
        loss = torch.mean((z_q.detach() - zl) ** 2) + self.beta * torch.mean(
            (z_q - zl.detach()) ** 2
        )
        return replace_grad(z_q, zl).movedim(-1, 1), loss, indices


class VQGAN(nn.Module):
    """taming's VQModel without its training parts: `encoder`, `quant_conv`, `quantize`,
    `post_quant_conv`, `decoder`. Images are in [-1, 1]."""

    def __init__(self, ddconfig: dict[str, Any], n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.ddconfig = dict(ddconfig)
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quantize = VectorQuantizer(n_embed, embed_dim)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

    @property
    def factor(self) -> int:
        """How many pixels one latent cell spans on a side: an image side
        must be a multiple of it."""
        return 2 ** (len(self.ddconfig["ch_mult"]) - 1)

    @property
    def codebook(self) -> torch.Tensor:
        return self.quantize.embedding.weight

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(quantised latent, quantiser loss, code indices) of images in
        [-1, 1], as taming's `encode`."""
        return self.quantize(self.quant_conv(self.encoder(x)))

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_q, loss, _ = self.encode(x)
        return self.decode(z_q), loss


# ---- straight-through quantisation (VQGAN-CLIP's `vector_quantize`) --------------------------
class _ReplaceGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x_forward: torch.Tensor, x_backward: torch.Tensor) -> torch.Tensor:
        ctx.shape = x_backward.shape
        return x_forward

    @staticmethod
    def backward(ctx: Any, grad_in: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, grad_in.sum_to_size(ctx.shape)


def replace_grad(x_forward: torch.Tensor, x_backward: torch.Tensor) -> torch.Tensor:
    """`x_forward`'s value with the gradient passed straight to `x_backward`
    (VQGAN-CLIP's replace_grad)."""
    return _ReplaceGrad.apply(x_forward, x_backward)


def nearest_code(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row for each vector of z (..., e_dim)."""
    d = z.pow(2).sum(-1, keepdim=True) + codebook.pow(2).sum(1) - 2 * z @ codebook.T
    return d.argmin(-1)


def vector_quantize(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Snap each vector of z (..., e_dim) to its nearest codebook row;
    the gradient goes straight to z."""
    indices = nearest_code(z, codebook)
    return replace_grad(F.one_hot(indices, codebook.shape[0]).to(z.dtype) @ codebook, z)


# ---- taming's files ---------------------------------------------------------------------------
def read_config(path: str | Path) -> dict[str, Any]:
    """`model.params` of a taming model.yaml: ddconfig, n_embed, embed_dim (VQModel only)."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise VQGANError(f"VQGAN config {path}: no such file") from None
    except yaml.YAMLError as exc:
        raise VQGANError(f"VQGAN config {path}: not YAML ({str(exc).splitlines()[0]})") from None
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("params"), dict):
        raise VQGANError(
            f"VQGAN config {path}: no model.params section (is it a taming model.yaml?)"
        )
    target = model.get("target", VQMODEL_TARGET)
    if target != VQMODEL_TARGET:
        raise VQGANError(
            f"VQGAN config {path}: model.target {target!r} is not supported; only {VQMODEL_TARGET}"
        )
    params = model["params"]
    missing = [k for k in ("ddconfig", "n_embed", "embed_dim") if k not in params]
    dd = params.get("ddconfig") or {}
    missing += [
        f"ddconfig.{k}"
        for k in (
            "ch",
            "out_ch",
            "ch_mult",
            "num_res_blocks",
            "attn_resolutions",
            "in_channels",
            "resolution",
            "z_channels",
        )
        if k not in dd
    ]
    if missing:
        raise VQGANError(f"VQGAN config {path}: model.params lacks {', '.join(missing)}")
    if dd.get("double_z"):
        raise VQGANError(
            f"VQGAN config {path}: ddconfig.double_z is true; "
            "a VQModel's encoder has double_z: false"
        )
    bad = [c for c in (dd["ch"] * m for m in dd["ch_mult"]) if c % 32]
    if bad:
        raise VQGANError(
            f"VQGAN config {path}: channel widths {bad} "
            "are not multiples of 32 (GroupNorm's groups)"
        )
    return {
        "ddconfig": dict(dd),
        "n_embed": int(params["n_embed"]),
        "embed_dim": int(params["embed_dim"]),
    }


class _StubUnpickler(pickle.Unpickler):
    """Reads a Lightning checkpoint without running its code: torch's tensor rebuilders and plain
    containers are real, every other class (callback states, hyper-parameter objects) a stub."""

    _REAL = ("torch", "collections", "numpy", "builtins", "_codecs")

    def find_class(self, module: str, name: str) -> Any:
        if module.split(".")[0] in self._REAL and (
            module != "builtins"
            or name in {"set", "frozenset", "slice", "dict", "list", "tuple", "bytearray"}
        ):
            return super().find_class(module, name)
        return type(name, (_Stub,), {"__module__": module})


class _Stub:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


class _StubPickle:
    """A `pickle_module` for torch.load whose Unpickler is `_StubUnpickler`."""

    Unpickler = _StubUnpickler
    load = staticmethod(pickle.load)
    __name__ = "pickle"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights of a Lightning checkpoint (`state_dict`), or of a bare state_dict file."""
    path = Path(path)
    if not path.is_file():
        raise VQGANError(f"VQGAN checkpoint {path}: no such file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # checkpoints of old Lightning versions pickle callback classes
        try:
            blob = torch.load(
                path, map_location="cpu", weights_only=False, pickle_module=_StubPickle
            )
        except Exception as exc:  # any unreadable file: one message naming it
            raise VQGANError(
                f"VQGAN checkpoint {path}: cannot be read ({type(exc).__name__}: {exc})"
            ) from None
    except Exception as exc:  # truncated or not a torch file at all
        raise VQGANError(
            f"VQGAN checkpoint {path}: cannot be read ({type(exc).__name__}: {exc})"
        ) from None
    sd = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise VQGANError(f"VQGAN checkpoint {path}: holds no state_dict of tensors")
    return {k: v for k, v in sd.items() if not k.startswith(IGNORED_PREFIXES)}


def load_vqgan(config: str | Path, ckpt: str | Path, device: str = "cpu") -> VQGAN:
    """A taming VQModel (config + Lightning checkpoint) as a frozen `VQGAN` in eval mode.

    A pair that does not match (other widths, levels or codebook size) is a VQGANError naming
    the first missing, unexpected or mis-shaped keys.
    """
    cfg = read_config(config)
    model = VQGAN(**cfg)
    sd = read_state_dict(ckpt)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{what} {items[:3]}{' ...' if len(items) > 3 else ''}"
            for what, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches (checkpoint vs config)", shapes),
            )
            if items
        ]
        raise VQGANError(
            f"VQGAN checkpoint {ckpt} does not match config {config}: {'; '.join(parts)}"
        )
    model.load_state_dict(sd)
    return model.to(device).eval().requires_grad_(False)


def taming_config(ddconfig: dict[str, Any], n_embed: int, embed_dim: int) -> dict[str, Any]:
    """A model.yaml document in taming's layout
    (its lossconfig included, as taming's own configs have)."""
    return {
        "model": {
            "base_learning_rate": 4.5e-6,
            "target": VQMODEL_TARGET,
            "params": {
                "embed_dim": embed_dim,
                "n_embed": n_embed,
                "ddconfig": dict(ddconfig),
                "lossconfig": {
                    "target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                    "params": {"disc_start": 10000, "codebook_weight": 1.0},
                },
            },
        }
    }


def save_taming(
    model: VQGAN,
    folder: str | Path,
    extra_state: dict[str, torch.Tensor] | None = None,
    **ckpt_fields: Any,
) -> tuple[Path, Path]:
    """Write `model.yaml` + `last.ckpt` as taming's training writes them (the weights under the
    checkpoint's `state_dict`, plus `extra_state` such as loss keys); returns the two paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    doc = taming_config(model.ddconfig, model.quantize.n_e, model.quantize.e_dim)
    config, ckpt = folder / CONFIG_FILE, folder / CKPT_FILE
    with atomic_path(config) as tmp:
        Path(tmp).write_text(yaml.safe_dump(doc, sort_keys=False))
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(ckpt) as tmp:
        torch.save({"state_dict": {**sd, **(extra_state or {})}, **ckpt_fields}, tmp)
    return config, ckpt


def bundled_vqgan() -> tuple[Path, Path]:
    """(model.yaml, last.ckpt) of `sieve-vqgan` in the cache, trained first
    (child process) when missing."""
    folder = BUNDLED[BUNDLED_NAME].ensure()
    return folder / CONFIG_FILE, folder / CKPT_FILE
