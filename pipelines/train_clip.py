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
import re
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

IMAGE_SIZE = 64
CONTEXT_LENGTH = 20
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
# The default recipe (see `recipe()`): one place, shared by the API, the CLI and the cache check.
STEPS, BATCH_SIZE, N_SAMPLES, LR, HARD_NEGATIVES = 1400, 128, 30000, 1e-3, 2


def tiny_config(width: int = 128, layers: int = 3, embed_dim: int = 128, vision: str = "resnet") -> dict[str, Any]:
    """The open_clip model config of sieve-tiny: a small image tower (open_clip's ModifiedResNet,
    as in RN50, or a ViT) and a small text transformer."""
    if vision == "resnet":  # layers as a tuple makes open_clip build ModifiedResNet
        vision_cfg: dict[str, Any] = {"image_size": IMAGE_SIZE, "layers": [2, 2, 2, 2], "width": 16}
    elif vision == "vit":
        vision_cfg = {"image_size": IMAGE_SIZE, "layers": layers, "width": width, "head_width": 32,
                      "patch_size": 8, "mlp_ratio": 2.0}
    else:
        raise ValueError(f"vision must be 'resnet' or 'vit', got {vision!r}")
    return {
        "embed_dim": embed_dim,
        "vision_cfg": vision_cfg,
        "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": 49408, "width": width,
                     "heads": width // 32, "layers": max(1, layers - 1), "mlp_ratio": 2.0},
    }


def recipe(seed: int = 0, steps: int = STEPS, batch_size: int = BATCH_SIZE, n_samples: int = N_SAMPLES,
           lr: float = LR, width: int = 128, layers: int = 3, vision: str = "resnet",
           hard_negatives: int = HARD_NEGATIVES) -> dict[str, Any]:
    """Everything that determines the trained weights; a cached model with another recipe is stale."""
    return {"model_cfg": tiny_config(width=width, layers=layers, vision=vision), "seed": seed, "steps": steps,
            "batch_size": batch_size, "n_samples": n_samples, "lr": lr, "image_size": IMAGE_SIZE,
            "hard_negatives": hard_negatives}


def swap_shape(caption: str, attrs: dict[str, Any], new: str) -> str:
    """The caption with its shape noun replaced by shape `new`'s (same number): a hard negative.

    Random batches rarely hold two captions that differ only in shape, so plain contrastive
    training can match colour, count and background and never learn shape (NegCLIP's lesson).
    """
    from pipelines.scenes import noun

    old_noun, new_noun = noun(attrs["shape"], attrs["count"]), noun(new, attrs["count"])
    swapped = re.sub(rf"\b{old_noun}\b", new_noun, caption, count=1)
    if swapped == caption:
        raise ValueError(f"caption {caption!r} does not name its shape {old_noun!r}")
    return swapped


def _dataset(n: int, seed: int):
    """Generate n scenes once, in memory: a uint8 image tensor, token ids, each scene's shape
    index, and the token ids of its caption with the shape swapped to every shape (hard negatives;
    row `shape` of a scene is its own caption)."""
    import numpy as np
    import open_clip
    import torch
    from tqdm import tqdm

    from pipelines.sample import SHAPES, iter_samples

    tok = open_clip.tokenizer.SimpleTokenizer(context_length=CONTEXT_LENGTH)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    captions, swapped, shapes = [], [], []
    for i, s in enumerate(tqdm(iter_samples(n, size=IMAGE_SIZE, seed=seed), total=n, desc="generating scenes")):
        images[i] = np.asarray(s.image.convert("RGB"))
        captions.append(s.caption)
        shapes.append(SHAPES.index(s.attrs["shape"]))
        swapped.extend(s.caption if new == s.attrs["shape"] else swap_shape(s.caption, s.attrs, new) for new in SHAPES)
    tokens = torch.cat([tok(captions[i:i + 4096]) for i in range(0, n, 4096)])
    swap_tokens = torch.cat([tok(swapped[i:i + 4096]) for i in range(0, len(swapped), 4096)])
    return (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), tokens, torch.tensor(shapes),
            swap_tokens.view(n, len(SHAPES), CONTEXT_LENGTH))


class NegativeMiner:
    """Picks which shape each hard-negative caption swaps in, favouring the shapes the model
    currently confuses with the true one (a running confusion estimate from the training logits):
    uniform picks spend most of the signal on easy pairs such as circle vs star."""

    def __init__(self, n_shapes: int, momentum: float = 0.95) -> None:
        import torch

        self.confusion = torch.full((n_shapes, n_shapes), 1.0 / (n_shapes - 1))
        self.confusion.fill_diagonal_(0.0)
        self.momentum = momentum

    def pick(self, true_shapes, k: int, generator):
        """(B, k) negative shape indices, distinct per row, never the true shape."""
        import torch

        weights = self.confusion[true_shapes] + 0.02  # floor: every pair keeps being seen
        weights[torch.arange(len(true_shapes)), true_shapes] = 0.0
        return torch.multinomial(weights, k, replacement=False, generator=generator)

    def update(self, true_shapes, neg_shapes, neg_probs) -> None:
        """Fold in how much probability each image gave its negative captions."""
        import torch

        total = torch.zeros_like(self.confusion)
        count = torch.zeros_like(self.confusion)
        rows = true_shapes[:, None].expand_as(neg_shapes)
        total.index_put_((rows.reshape(-1), neg_shapes.reshape(-1)), neg_probs.reshape(-1), accumulate=True)
        count.index_put_((rows.reshape(-1), neg_shapes.reshape(-1)), torch.ones(neg_probs.numel()), accumulate=True)
        seen = count > 0
        self.confusion[seen] = self.momentum * self.confusion[seen] + (1 - self.momentum) * total[seen] / count[seen]


def zero_shot(model, n: int = 600, seed: int = 777) -> dict[str, float]:
    """Zero-shot colour and shape accuracy on n held-out scenes (prompt ensembles), for progress logs."""
    import numpy as np
    import open_clip
    import torch

    from pipelines.sample import COLORS, SHAPES, iter_samples

    samples = list(iter_samples(n, size=IMAGE_SIZE, seed=seed))
    pixels = torch.from_numpy(np.stack([np.asarray(s.image.convert("RGB")) for s in samples])).permute(0, 3, 1, 2)
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=CONTEXT_LENGTH)
    prompts = tok([f"a photo of a {c} {shape}" for shape in SHAPES for c in COLORS])
    was_training = model.training
    model.eval()
    with torch.no_grad():
        img = model.encode_image(_normalise(pixels, torch.tensor(MEAN).view(1, 3, 1, 1),
                                            torch.tensor(STD).view(1, 3, 1, 1)), normalize=True)
        txt = model.encode_text(prompts, normalize=True).view(len(SHAPES), len(COLORS), -1)
    model.train(was_training)
    shape_pred = (img @ torch.nn.functional.normalize(txt.mean(1), dim=-1).T).argmax(1)
    color_pred = (img @ torch.nn.functional.normalize(txt.mean(0), dim=-1).T).argmax(1)
    return {"shape_acc": round(float(np.mean([SHAPES[i] == s.attrs["shape"] for i, s in zip(shape_pred, samples)])), 3),
            "color_acc": round(float(np.mean([list(COLORS)[i] == s.attrs["color"] for i, s in zip(color_pred, samples)])), 3)}


def _normalise(batch_u8, mean, std):
    return (batch_u8.float() / 255.0 - mean) / std


def train_clip(out: str | Path | None = None, seed: int = 0, steps: int = STEPS, batch_size: int = BATCH_SIZE,
               n_samples: int = N_SAMPLES, lr: float = LR, width: int = 128, layers: int = 3,
               vision: str = "resnet", hard_negatives: int = HARD_NEGATIVES, threads: int | None = None,
               eval_every: int = 0) -> Path:
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
    images, tokens, shapes, swap_tokens = _dataset(n_samples, seed=1000 + seed)
    gen_s = time.time() - t0
    cfg = tiny_config(width=width, layers=layers, vision=vision)
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
    miner = NegativeMiner(swap_tokens.shape[1])
    model.train()
    t1 = time.time()
    losses = []
    bar = tqdm(range(steps), desc="training sieve-tiny")
    for step in bar:
        idx = torch.randint(0, n_samples, (batch_size,), generator=gen)
        img = _normalise(images[idx], mean, std)
        text = tokens[idx]
        if hard_negatives:
            neg_shapes = miner.pick(shapes[idx], hard_negatives, gen)  # (B, k)
            text = torch.cat([text, swap_tokens[idx[:, None], neg_shapes].flatten(0, 1)])
        img_f, txt_f, scale = model(img, text)
        logits = scale * img_f @ txt_f.t()  # (B, B(1 + k)): each image also sees every shape-swapped caption
        labels = torch.arange(batch_size)
        if hard_negatives:
            with torch.no_grad():
                probs = logits.softmax(1)[:, batch_size:].view(batch_size, batch_size, hard_negatives)
                miner.update(shapes[idx], neg_shapes, probs[labels, labels])
        loss = (torch.nn.functional.cross_entropy(logits, labels)
                + torch.nn.functional.cross_entropy(logits[:, :batch_size].t(), labels)) / 2
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
        if eval_every and (step + 1) % eval_every == 0:
            log.info("step %d: %s", step + 1, zero_shot(model))
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
            "params": sum(p.numel() for p in model.parameters()),
            "recipe": recipe(seed, steps, batch_size, n_samples, lr, width, layers, vision, hard_negatives)}
    tmp.replace(out / "open_clip_model.safetensors")
    info_tmp = out / "train_info.json.tmp"
    info_tmp.write_text(json.dumps(info, indent=2))
    info_tmp.replace(out / "train_info.json")  # last: its recipe says the folder is complete and current
    log.info("sieve-tiny saved to %s (%s)", out, info)
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: python -m pipelines.train_clip --out DIR --seed S --steps N."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output folder (default: cache_dir()/sieve-tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--n-samples", type=int, default=N_SAMPLES, help="generated training pairs")
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--vision", choices=["resnet", "vit"], default="resnet", help="image tower (resnet: ModifiedResNet)")
    p.add_argument("--hard-negatives", type=int, default=HARD_NEGATIVES,
                   help="shape-swapped negative captions per caption (0: plain in-batch contrastive loss)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=0, help="log held-out zero-shot accuracy every N steps")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(train_clip(a.out, a.seed, a.steps, a.batch_size, a.n_samples, a.lr, a.width, a.layers, a.vision,
                     a.hard_negatives, a.threads, a.eval_every))


if __name__ == "__main__":
    main()
