"""Train `sieve-tiny`: a small CLIP of open_clip's architecture, on generated scenes, on CPU.

`python -m pipelines.train_clip [--out DIR] [--seed S] [--steps N]` writes an open_clip
local-dir folder (open_clip_config.json + open_clip_model.safetensors + train_info.json) that
`load_clip("sieve-tiny")` and `open_clip.create_model_and_transforms("local-dir:DIR")` read.
Deterministic per seed; a few minutes on two cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

IMAGE_SIZE = 64
CONTEXT_LENGTH = 20
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


def tiny_config(width: int = 128, layers: int = 3, embed_dim: int = 128) -> dict[str, Any]:
    """The open_clip model config of sieve-tiny (a custom config: small ViT + small text transformer)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": IMAGE_SIZE, "layers": layers, "width": width, "head_width": 32,
                       "patch_size": 16, "mlp_ratio": 2.0},
        "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": 49408, "width": width,
                     "heads": width // 32, "layers": max(1, layers - 1), "mlp_ratio": 2.0},
    }


def _dataset(n: int, seed: int):
    """Generate n scenes once, in memory: a uint8 image tensor and token ids."""
    import numpy as np
    import open_clip
    import torch
    from tqdm import tqdm

    from pipelines.sample import iter_samples

    tok = open_clip.tokenizer.SimpleTokenizer(context_length=CONTEXT_LENGTH)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    captions = []
    for i, s in enumerate(tqdm(iter_samples(n, size=IMAGE_SIZE, seed=seed), total=n, desc="generating scenes")):
        images[i] = np.asarray(s.image.convert("RGB"))
        captions.append(s.caption)
    tokens = torch.cat([tok(captions[i:i + 4096]) for i in range(0, n, 4096)])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), tokens


def _normalise(batch_u8, mean, std):
    return (batch_u8.float() / 255.0 - mean) / std


def train_clip(out: str | Path | None = None, seed: int = 0, steps: int = 500, batch_size: int = 128,
               n_samples: int = 20000, lr: float = 2e-3, width: int = 128, layers: int = 3,
               threads: int | None = None) -> Path:
    """Train sieve-tiny contrastively and save it as an open_clip local-dir folder; returns the folder."""
    import open_clip
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    from pipelines.encoders import tiny_dir

    out = Path(out) if out else tiny_dir()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # NaN-filling every empty() costs ~40%
    t0 = time.time()
    images, tokens = _dataset(n_samples, seed=1000 + seed)
    gen_s = time.time() - t0
    cfg = tiny_config(width=width, layers=layers)
    model = open_clip.CLIP(**cfg)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t1 = time.time()
    losses = []
    bar = tqdm(range(steps), desc="training sieve-tiny")
    for step in bar:
        idx = torch.randint(0, n_samples, (batch_size,), generator=gen)
        img = _normalise(images[idx], mean, std)
        img_f, txt_f, scale = model(img, tokens[idx])
        logits = scale * img_f @ txt_f.t()
        labels = torch.arange(batch_size)
        loss = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.t(), labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    train_s = time.time() - t1
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "open_clip_model.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    config = {"model_cfg": cfg, "preprocess_cfg": {"mean": list(MEAN), "std": list(STD),
                                                    "interpolation": "bicubic", "resize_mode": "shortest"}}
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    info = {"seed": seed, "steps": steps, "batch_size": batch_size, "n_samples": n_samples, "lr": lr,
            "generate_seconds": round(gen_s, 1), "train_seconds": round(train_s, 1),
            "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4), "torch_threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in model.parameters())}
    (out / "train_info.json").write_text(json.dumps(info, indent=2))
    tmp.replace(out / "open_clip_model.safetensors")  # weights last: their presence means complete
    log.info("sieve-tiny saved to %s (%s)", out, info)
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: python -m pipelines.train_clip --out DIR --seed S --steps N."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output folder (default: cache_dir()/sieve-tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--n-samples", type=int, default=20000, help="generated training pairs")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(train_clip(a.out, a.seed, a.steps, a.batch_size, a.n_samples, a.lr, a.width, a.layers, a.threads))


if __name__ == "__main__":
    main()
