"""`sieve-vqgan`: a small VQGAN of taming's architecture, trained here on generated scenes, on CPU.

`train(out, **recipe)` writes `model.yaml` + `last.ckpt` in taming's format (so the bundled
model goes through the same loader as a user's checkpoint) and `train_info.json`. The recipe's
knobs are its `BUNDLED` entry in `models.cache`; run it with `python -m models.train sieve-vqgan`.

What it leaves out of taming's recipe, to fit the demo's CPU budget: the LPIPS and patch-GAN
terms (LPIPS needs downloaded VGG weights; the adversarial game needs far more steps than a
first-use training can spend). It minimises L1 + MSE reconstruction plus taming's codebook
and commitment terms, on random crops of the scenes (the network is convolutional, so crops
teach it the same local statistics at a quarter of the pixels), and re-seeds codebook entries
no latent chose from recent encoder outputs, the usual cure for codebook collapse.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.cache import BUNDLED, read_info, write_info
from models.packing import read_packed, write_packed
from models.runtime import isolated_torch, progress
from models.scenes import iter_samples
from models.vqgan import BUNDLED_NAME, CKPT_FILE, CONFIG_FILE, VQGAN, load_vqgan, save_taming

log = logging.getLogger(__name__)
IMAGE_SIZE = 64


def ddconfig(ch: int, z_channels: int, levels: int) -> dict:
    """taming's ddconfig for a small model: `levels` resolutions
    (ch, 2ch, 2ch, ...), one res block each."""
    return {
        "double_z": False,
        "z_channels": z_channels,
        "resolution": IMAGE_SIZE,
        "in_channels": 3,
        "out_ch": 3,
        "ch": ch,
        "ch_mult": [1] + [2] * (levels - 1),
        "num_res_blocks": 1,
        "attn_resolutions": [],
        "dropout": 0.0,
    }


def _scenes(n: int, seed: int) -> torch.Tensor:
    """n generated scenes as a uint8 (n, 3, 64, 64) tensor."""
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for i, s in enumerate(
        progress(
            iter_samples(n, size=IMAGE_SIZE, seed=seed, watermark_fraction=0.1),
            total=n,
            desc="generating scenes",
        )
    ):
        images[i] = np.asarray(s.image.convert("RGB"))
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def _batch(images: torch.Tensor, batch_size: int, crop: int, gen: torch.Generator) -> torch.Tensor:
    """A random batch of random crops (one offset per batch), as floats in [-1, 1]."""
    idx = torch.randint(0, len(images), (batch_size,), generator=gen)
    y, x = (int(v) for v in torch.randint(0, IMAGE_SIZE - crop + 1, (2,), generator=gen))
    return images[idx, :, y : y + crop, x : x + crop].float() / 127.5 - 1


def train(
    out: str | Path,
    seed: int,
    steps: int,
    batch_size: int,
    crop: int,
    n_samples: int,
    lr: float,
    ch: int,
    z_channels: int,
    levels: int,
    n_embed: int,
    embed_dim: int,
) -> Path:
    """Train sieve-vqgan with this recipe; write model.yaml,
    last.ckpt and train_info.json under `out`."""
    recipe = BUNDLED[BUNDLED_NAME].recipe(
        seed=seed,
        steps=steps,
        batch_size=batch_size,
        crop=crop,
        n_samples=n_samples,
        lr=lr,
        ch=ch,
        z_channels=z_channels,
        levels=levels,
        n_embed=n_embed,
        embed_dim=embed_dim,
    )
    if crop % 2 ** (levels - 1) or not 0 < crop <= IMAGE_SIZE:
        raise ValueError(
            f"crop {crop} must be in (0, {IMAGE_SIZE}] and a multiple of {2 ** (levels - 1)}"
        )
    out = Path(out)
    # seeded but not in deterministic mode: its convolution kernels cost twice as much on the CPU
    with isolated_torch():
        torch.manual_seed(seed)
        t0 = time.time()
        images = _scenes(n_samples, seed=2000 + seed)
        gen_s = time.time() - t0
        model = VQGAN(ddconfig(ch, z_channels, levels), n_embed, embed_dim)
        t1 = time.time()
        losses, used = _fit(model, images, steps, batch_size, crop, lr, seed)
        train_s = time.time() - t1
        held_out = _scenes(64, seed=3000 + seed).float() / 127.5 - 1
        with torch.no_grad():
            rec, _ = model.eval()(held_out)
        psnr = float(10 * math.log10(4 / F.mse_loss(rec.clamp(-1, 1), held_out).item()))
        threads = torch.get_num_threads()
    save_taming(model, out, global_step=steps, epoch=0)
    write_info(
        out,
        recipe,
        generate_seconds=round(gen_s, 1),
        train_seconds=round(train_s, 1),
        final_loss=round(float(np.mean(losses[-20:])), 4),
        held_out_psnr=round(psnr, 2),
        codes_used=used,
        torch_threads=threads,
        params=sum(p.numel() for p in model.parameters()),
    )
    log.info(
        "sieve-vqgan saved to %s (held-out PSNR %.1f dB, %d of %d codes used)",
        out,
        psnr,
        used,
        n_embed,
    )
    return out


def pack(folder: str | Path) -> Path:
    """Write a trained folder as the repository's packed copy
    (float16 weights, recipe and facts)."""
    folder = Path(folder)
    model = load_vqgan(folder / CONFIG_FILE, folder / CKPT_FILE)
    info = read_info(folder)
    about = {"recipe": info["recipe"], "meta": {k: v for k, v in info.items() if k != "recipe"}}
    return write_packed(BUNDLED[BUNDLED_NAME], model.state_dict(), about)


def unpack(out: str | Path) -> Path:
    """Build the cache folder (taming's model.yaml + last.ckpt) from the
    repository's packed copy."""
    tensors, about = read_packed(BUNDLED[BUNDLED_NAME])
    r = about["recipe"]
    model = VQGAN(ddconfig(r["ch"], r["z_channels"], r["levels"]), r["n_embed"], r["embed_dim"])
    model.load_state_dict(tensors)
    out = Path(out)
    save_taming(model, out, global_step=r["steps"], epoch=0)
    write_info(
        out,
        r,
        **about["meta"],
        unpacked_from=f"models/weights/{BUNDLED_NAME}.safetensors (float16)",
    )
    return out


def _fit(
    model: VQGAN, images: torch.Tensor, steps: int, batch_size: int, crop: int, lr: float, seed: int
) -> tuple[list[float], int]:
    """Reconstruction + codebook training (Adam, warm-up then cosine);
    (per-step losses, codes in use at the end)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.9))  # taming's betas
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warmup
            if s < warmup
            else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))
        ),
    )
    gen = torch.Generator().manual_seed(seed)
    n_embed = model.quantize.n_e
    usage = torch.zeros(n_embed)
    model.train()
    losses: list[float] = []
    bar = progress(range(steps), desc="training sieve-vqgan")
    for step in bar:
        x = _batch(images, batch_size, crop, gen)
        z = model.quant_conv(model.encoder(x))
        z_q, q_loss, indices = model.quantize(z)
        rec = model.decode(z_q)
        loss = (rec - x).abs().mean() + F.mse_loss(rec, x) + q_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        usage.mul_(0.9).index_add_(0, indices.flatten(), torch.ones(indices.numel()))
        if step % 25 == 24 and step < steps * 0.8:
            _restart_dead_codes(model, z.detach(), usage, gen)
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}", codes=int((usage > 0.01).sum()))
    return losses, int((usage > 0.01).sum())


@torch.no_grad()
def _restart_dead_codes(
    model: VQGAN, z: torch.Tensor, usage: torch.Tensor, gen: torch.Generator
) -> None:
    """Move codebook entries no recent latent chose onto random latents of this
    batch (usage reset for them)."""
    dead = (usage < 0.01).nonzero().flatten()
    if not len(dead):
        return
    pool = z.movedim(1, -1).reshape(-1, z.shape[1])
    pick = torch.randint(0, len(pool), (len(dead),), generator=gen)
    model.quantize.embedding.weight[dead] = pool[pick] + 0.01 * torch.randn(
        len(dead), pool.shape[1], generator=gen
    )
    usage[dead] = 1.0
