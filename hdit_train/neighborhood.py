"""2-D neighborhood attention (NATTEN semantics) in pure PyTorch, plus an optional natten kernel.

Every query at (i, j) attends to the kernel_size × kernel_size keys of the window that is
centred on it and shifted inwards at the borders, so every query sees exactly kernel_size²
keys. The CPU path tiles the queries into T × T blocks that share one halo of
(T + kernel_size - 1)² keys, masks the few keys outside each query's own window, and runs
batched `scaled_dot_product_attention` on the blocks: dense matmuls, cost linear in pixels.
Halos are strided views of the padded keys when the grid divides into tiles, index gathers
otherwise.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

try:  # optional fused kernel (natten >= 0.20 exposes na2d); used on CUDA only
    from natten import na2d as _natten_na2d
except ImportError:  # not installed: the PyTorch path below is the default
    _natten_na2d = None


def window_starts(n: int, kernel_size: int, device: torch.device | None = None) -> torch.Tensor:
    """First key index of each query's window along one axis (centred, clamped at borders)."""
    idx = torch.arange(n, device=device)
    return (idx - kernel_size // 2).clamp(0, n - kernel_size)


def _axis_mask(n: int, kernel_size: int, device: torch.device) -> torch.Tensor:
    """(n, n) bool: key j lies in the window of query i along one axis."""
    start = window_starts(n, kernel_size, device)[:, None]
    key = torch.arange(n, device=device)[None, :]
    return (key >= start) & (key < start + kernel_size)


def neighborhood_mask(
    h: int, w: int, kernel_size: int, device: torch.device | None = None
) -> torch.Tensor:
    """(h*w, h*w) bool mask of allowed query→key pairs; the brute-force definition."""
    device = device or torch.device("cpu")
    my, mx = _axis_mask(h, kernel_size, device), _axis_mask(w, kernel_size, device)
    return (my[:, None, :, None] & mx[None, :, None, :]).reshape(h * w, h * w)


def brute_force_na2d(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: int, scale: float = 1.0
) -> torch.Tensor:
    """Reference: full attention with the neighborhood mask. Layout (B, heads, H, W, D)."""
    b, nh, h, w, d = q.shape
    mask = neighborhood_mask(h, w, kernel_size, q.device)
    scores = (
        torch.einsum("bnqd,bnkd->bnqk", q.reshape(b, nh, h * w, d), k.reshape(b, nh, h * w, d))
        * scale
    )
    scores = scores.masked_fill(~mask, float("-inf"))
    out = scores.softmax(-1) @ v.reshape(b, nh, h * w, d)
    return out.reshape(b, nh, h, w, d)


def _tiles(n: int, tile: int, kernel_size: int, device: torch.device):
    """Per-axis tiling: query tile starts, halo starts, and the (tiles, tile, halo) window mask."""
    halo = tile + kernel_size - 1
    n_tiles = -(-n // tile)
    q_start = torch.clamp(torch.arange(n_tiles, device=device) * tile, max=n - tile)
    k_start = (q_start - kernel_size // 2).clamp(0, n - halo)
    q_pos = q_start[:, None] + torch.arange(tile, device=device)  # (tiles, tile)
    k_pos = k_start[:, None] + torch.arange(halo, device=device)  # (tiles, halo)
    ws = window_starts(n, kernel_size, device)[q_pos]  # (tiles, tile)
    mask = (k_pos[:, None, :] >= ws[..., None]) & (k_pos[:, None, :] < ws[..., None] + kernel_size)
    # which tile and offset each output position is read from (last tile may overlap)
    owner = torch.clamp(torch.arange(n, device=device) // tile, max=n_tiles - 1)
    offset = torch.arange(n, device=device) - q_start[owner]
    return q_pos, k_pos, mask, owner, offset


def _padded_axis_mask(n: int, tile: int, kernel_size: int, device: torch.device) -> torch.Tensor:
    """(tiles, tile, halo) window mask when halos are read from the input
    padded by kernel_size // 2."""
    halo = tile + kernel_size - 1
    q_pos = torch.arange(n, device=device).view(n // tile, tile)
    k_pos = (torch.arange(n // tile, device=device) * tile)[:, None] + torch.arange(
        halo, device=device
    )
    k_pos = k_pos - kernel_size // 2  # back to unpadded coordinates; pads are never inside a window
    ws = window_starts(n, kernel_size, device)[q_pos]
    return (k_pos[:, None, :] >= ws[..., None]) & (k_pos[:, None, :] < ws[..., None] + kernel_size)


@functools.lru_cache(maxsize=32)
def _strided_bias(
    h: int, w: int, kernel_size: int, tile: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Additive mask (0 inside each query's window, -inf outside),
    (1, tiles, tile², halo²); cached."""
    halo, ty, tx = tile + kernel_size - 1, h // tile, w // tile
    my, mx = (
        _padded_axis_mask(h, tile, kernel_size, device),
        _padded_axis_mask(w, tile, kernel_size, device),
    )
    allowed = (my[:, None, :, None, :, None] & mx[None, :, None, :, None, :]).reshape(
        1, ty * tx, tile * tile, halo * halo
    )
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
        ~allowed, float("-inf")
    )


def _na2d_strided(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: int, scale: float, tile: int
) -> torch.Tensor:
    """Tiled NA for grids divisible by the tile: query tiles are reshapes and key halos strided
    windows (unfold) of the padded keys, so neither direction needs an index gather or a
    scatter-add, which dominate the general path's backward on large grids."""
    b, nh, h, w, d = q.shape
    pad, halo, ty, tx = kernel_size // 2, tile + kernel_size - 1, h // tile, w // tile

    def halos(t: torch.Tensor) -> torch.Tensor:
        t = F.pad(t, (0, 0, pad, pad, pad, pad)).unfold(2, halo, tile).unfold(3, halo, tile)
        return t.permute(0, 1, 2, 3, 5, 6, 4).reshape(b, nh, ty, tx, halo * halo, d)

    # 4-D (batch·heads, tiles, tokens, d) keeps SDPA on its fused CPU kernel; 6-D inputs fall
    # back to the math path, which materialises every tile's score matrix (cache-bound at 128²)
    qt = (
        q.reshape(b, nh, ty, tile, tx, tile, d)
        .transpose(3, 4)
        .reshape(b * nh, ty * tx, tile * tile, d)
    )
    mask = _strided_bias(h, w, kernel_size, tile, q.device, q.dtype)
    kt, vt = (halos(t).reshape(b * nh, ty * tx, halo * halo, d) for t in (k, v))
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
    return out.reshape(b, nh, ty, tx, tile, tile, d).transpose(3, 4).reshape(b, nh, h, w, d)


def _choose_tile(h: int, w: int, kernel_size: int) -> int | None:
    """Tile edge for the halo formulation, or None when one dense masked block is cheaper."""
    for tile in (8, 6, 4):
        halo = tile + kernel_size - 1
        if halo > min(h, w):
            continue
        n_tiles = -(-h // tile) * -(-w // tile)
        if (
            n_tiles * tile * tile * halo * halo < 0.25 * (h * w) ** 2
        ):  # gathers cost: tile only for big wins
            return tile
    return None


def na2d_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int,
    scale: float = 1.0,
    tile: int | None = None,
) -> torch.Tensor:
    """Neighborhood attention in PyTorch (autograd-friendly). Layout (B, heads, H, W, D)."""
    b, nh, h, w, d = q.shape
    if kernel_size > h or kernel_size > w:
        raise ValueError(f"kernel_size {kernel_size} is larger than the token grid {h}x{w}")
    tile = tile if tile is not None else _choose_tile(h, w, kernel_size)
    if tile is None:  # small grid: one dense block with the exact mask
        mask = neighborhood_mask(h, w, kernel_size, q.device)
        out = F.scaled_dot_product_attention(
            q.reshape(b, nh, h * w, d),
            k.reshape(b, nh, h * w, d),
            v.reshape(b, nh, h * w, d),
            attn_mask=mask,
            scale=scale,
        )
        return out.reshape(b, nh, h, w, d)
    if h % tile == 0 and w % tile == 0:
        return _na2d_strided(q, k, v, kernel_size, scale, tile)
    qy, ky, my, oy, fy = _tiles(h, tile, kernel_size, q.device)
    qx, kx, mx, ox, fx = _tiles(w, tile, kernel_size, q.device)
    ty, tx, halo = qy.shape[0], qx.shape[0], ky.shape[1]
    # gather query tiles (B, nh, ty, tx, tile*tile, d) and key/value halos (..., halo*halo, d)
    qt = q[:, :, qy[:, None, :, None], qx[None, :, None, :]].reshape(b, nh, ty, tx, tile * tile, d)
    kt = k[:, :, ky[:, None, :, None], kx[None, :, None, :]].reshape(b, nh, ty, tx, halo * halo, d)
    vt = v[:, :, ky[:, None, :, None], kx[None, :, None, :]].reshape(b, nh, ty, tx, halo * halo, d)
    mask = my[:, None, :, None, :, None] & mx[None, :, None, :, None, :]
    mask = mask.reshape(ty, tx, tile * tile, halo * halo)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
    out = out.reshape(b, nh, ty, tx, tile, tile, d)
    return out[:, :, oy[:, None], ox[None, :], fy[:, None], fx[None, :]]


def na2d(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: int, scale: float = 1.0
) -> torch.Tensor:
    """Neighborhood attention, layout (B, heads, H, W, D): natten on CUDA
    if present, else PyTorch."""
    if _natten_na2d is not None and q.is_cuda:
        try:
            out = _natten_na2d(
                q.permute(0, 2, 3, 1, 4),
                k.permute(0, 2, 3, 1, 4),
                v.permute(0, 2, 3, 1, 4),
                kernel_size=kernel_size,
                scale=scale,
            )
            return out.permute(0, 3, 1, 2, 4)
        except (TypeError, RuntimeError, NotImplementedError) as err:  # API or dtype mismatch
            log.warning("natten na2d failed (%s); using the PyTorch neighborhood attention", err)
    return na2d_torch(q, k, v, kernel_size, scale)
