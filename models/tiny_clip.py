"""`sieve-tiny`: a small CLIP of open_clip's architecture, trained on generated scenes, on CPU.

`train(out, **recipe)` writes an open_clip local-dir folder (open_clip_config.json +
open_clip_model.safetensors + train_info.json) that `load_clip("sieve-tiny")` and
`open_clip.create_model_and_transforms("local-dir:DIR")` read. Deterministic per seed. The
recipe's knobs and defaults are its `BUNDLED` entry in `models.cache`; run it with
`python -m models.train sieve-tiny`.

The image tower is open_clip's ModifiedResNet (the RN50 design at width 16, for 64² inputs),
the text tower a small transformer. Each caption also comes with shape-swapped copies ("two
red stars" for "two red crosses") as hard negatives, mined online toward the shapes the model
currently confuses: random batches rarely hold two captions that differ only in shape, so
plain contrastive training matches colour, count and background and never learns shape.
"""

from __future__ import annotations

import logging
import math
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from safetensors.torch import load_file, save_file

from collection.storage import write_json
from models.cache import BUNDLED, read_info, write_info
from models.packing import read_packed, write_packed
from models.runtime import isolated_torch, progress
from models.scenes import SHAPES, iter_samples, noun

log = logging.getLogger(__name__)

IMAGE_SIZE = 64
CONTEXT_LENGTH = 20
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
PREPROCESS_CFG = {
    "mean": list(MEAN),
    "std": list(STD),
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}
WEIGHTS = "open_clip_model.safetensors"
EMBEDDING = "token_embedding.weight"


def tiny_config(
    width: int = 128, layers: int = 3, embed_dim: int = 128, vision: str = "resnet"
) -> dict[str, Any]:
    """The open_clip model config: a small image tower
    (ModifiedResNet as in RN50, or a ViT) and text transformer."""
    if vision == "resnet":  # layers as a tuple makes open_clip build ModifiedResNet
        vision_cfg: dict[str, Any] = {"image_size": IMAGE_SIZE, "layers": [2, 2, 2, 2], "width": 16}
    elif vision == "vit":
        vision_cfg = {
            "image_size": IMAGE_SIZE,
            "layers": layers,
            "width": width,
            "head_width": 32,
            "patch_size": 8,
            "mlp_ratio": 2.0,
        }
    else:
        raise ValueError(f"vision must be 'resnet' or 'vit', got {vision!r}")
    return {
        "embed_dim": embed_dim,
        "vision_cfg": vision_cfg,
        "text_cfg": {
            "context_length": CONTEXT_LENGTH,
            "vocab_size": 49408,
            "width": width,
            "heads": width // 32,
            "layers": max(1, layers - 1),
            "mlp_ratio": 2.0,
        },
    }


def swap_shape(caption: str, attrs: dict[str, Any], new: str) -> str:
    """The caption with its shape noun replaced by shape `new`'s (same number): a hard negative."""
    old_noun, new_noun = noun(attrs["shape"], attrs["count"]), noun(new, attrs["count"])
    swapped = re.sub(rf"\b{old_noun}\b", new_noun, caption, count=1)
    if swapped == caption:
        raise ValueError(f"caption {caption!r} does not name its shape {old_noun!r}")
    return swapped


def _dataset(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Generate n scenes once, in memory: a uint8 image tensor, token ids, each scene's shape
    index, and the token ids of its caption with the shape swapped to every shape (hard negatives;
    row `shape` of a scene is its own caption)."""
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=CONTEXT_LENGTH)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    captions, swapped, shapes = [], [], []
    for i, s in enumerate(
        progress(iter_samples(n, size=IMAGE_SIZE, seed=seed), total=n, desc="generating scenes")
    ):
        images[i] = np.asarray(s.image.convert("RGB"))
        captions.append(s.caption)
        shapes.append(SHAPES.index(s.attrs["shape"]))
        swapped.extend(
            s.caption if new == s.attrs["shape"] else swap_shape(s.caption, s.attrs, new)
            for new in SHAPES
        )
    tokens = torch.cat([tok(captions[i : i + 4096]) for i in range(0, n, 4096)])
    swap_tokens = torch.cat([tok(swapped[i : i + 4096]) for i in range(0, len(swapped), 4096)])
    return (
        torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        tokens,
        torch.tensor(shapes),
        swap_tokens.view(n, len(SHAPES), CONTEXT_LENGTH),
    )


class NegativeMiner:
    """Picks which shape each hard-negative caption swaps in, favouring the shapes the model
    currently confuses with the true one (a running confusion estimate from the training logits):
    uniform picks spend most of the signal on easy pairs such as circle vs star."""

    def __init__(self, n_shapes: int, momentum: float = 0.95) -> None:
        self.confusion = torch.full((n_shapes, n_shapes), 1.0 / (n_shapes - 1))
        self.confusion.fill_diagonal_(0.0)
        self.momentum = momentum

    def pick(self, true_shapes: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
        """(B, k) negative shape indices, distinct per row, never the true shape."""
        weights = self.confusion[true_shapes] + 0.02  # floor: every pair keeps being seen
        weights[torch.arange(len(true_shapes)), true_shapes] = 0.0
        return torch.multinomial(weights, k, replacement=False, generator=generator)

    def update(
        self, true_shapes: torch.Tensor, neg_shapes: torch.Tensor, neg_probs: torch.Tensor
    ) -> None:
        """Fold in how much probability each image gave its negative captions."""
        total = torch.zeros_like(self.confusion)
        count = torch.zeros_like(self.confusion)
        rows = true_shapes[:, None].expand_as(neg_shapes)
        total.index_put_(
            (rows.reshape(-1), neg_shapes.reshape(-1)), neg_probs.reshape(-1), accumulate=True
        )
        count.index_put_(
            (rows.reshape(-1), neg_shapes.reshape(-1)),
            torch.ones(neg_probs.numel()),
            accumulate=True,
        )
        seen = count > 0
        self.confusion[seen] = (
            self.momentum * self.confusion[seen] + (1 - self.momentum) * total[seen] / count[seen]
        )


def _normalise(batch_u8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (batch_u8.float() / 255.0 - mean) / std


def train(
    out: str | Path,
    seed: int,
    steps: int,
    batch_size: int,
    n_samples: int,
    lr: float,
    width: int,
    layers: int,
    vision: str,
    hard_negatives: int,
) -> Path:
    """Train sieve-tiny contrastively with this recipe and save it as an
    open_clip local-dir folder."""
    recipe = BUNDLED["sieve-tiny"].recipe(
        seed=seed,
        steps=steps,
        batch_size=batch_size,
        n_samples=n_samples,
        lr=lr,
        width=width,
        layers=layers,
        vision=vision,
        hard_negatives=hard_negatives,
    )
    out = Path(out)
    with isolated_torch(deterministic=True):
        torch.manual_seed(seed)
        t0 = time.time()
        images, tokens, shapes, swap_tokens = _dataset(n_samples, seed=1000 + seed)
        gen_s = time.time() - t0
        cfg = tiny_config(width=width, layers=layers, vision=vision)
        model = open_clip.CLIP(**cfg)
        t1 = time.time()
        losses = _fit(
            model, images, tokens, shapes, swap_tokens, steps, batch_size, lr, hard_negatives, seed
        )
        train_s = time.time() - t1
        threads = torch.get_num_threads()
    _save(
        out,
        model,
        cfg,
        recipe,
        generate_seconds=round(gen_s, 1),
        train_seconds=round(train_s, 1),
        final_loss=round(sum(losses[-50:]) / len(losses[-50:]), 4),
        torch_threads=threads,
        params=sum(p.numel() for p in model.parameters()),
    )
    log.info("sieve-tiny saved to %s", out)
    return out


def _save(out: Path, model: Any, cfg: dict[str, Any], recipe: dict[str, Any], **facts: Any) -> None:
    """An open_clip local-dir folder: weights, config, then
    train_info.json (the completion mark)."""
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS))
    write_json(out / "open_clip_config.json", {"model_cfg": cfg, "preprocess_cfg": PREPROCESS_CFG})
    write_info(out, recipe, **facts)


def _initial(cfg: dict[str, Any], seed: int) -> Any:
    """The untrained model exactly as `train` draws it: the first use of
    torch's RNG after the seed."""
    with isolated_torch():
        torch.manual_seed(seed)
        return open_clip.CLIP(**cfg)


def pack(folder: str | Path) -> Path:
    """Write a trained folder as the repository's packed copy.

    The token embedding has 49408 rows but captions use a few dozen: the rows training never
    touched still hold the seeded initial values, so only the touched rows are stored and the
    rest are drawn again from the seed when unpacking.
    """
    folder = Path(folder)
    info = read_info(folder)
    recipe = info.get("recipe") or {}
    cfg = tiny_config(width=recipe["width"], layers=recipe["layers"], vision=recipe["vision"])
    state = load_file(str(folder / WEIGHTS))
    initial = _initial(cfg, recipe["seed"]).state_dict()[EMBEDDING]
    rows = torch.nonzero((state[EMBEDDING] != initial).any(dim=1)).flatten()
    tensors = {k: v for k, v in state.items() if k != EMBEDDING}
    tensors[f"{EMBEDDING}.rows"], tensors[f"{EMBEDDING}.values"] = rows, state[EMBEDDING][rows]
    facts = {k: v for k, v in info.items() if k != "recipe"}
    return write_packed(
        BUNDLED["sieve-tiny"], tensors, {"recipe": recipe, "model_cfg": cfg, "trained": facts}
    )


def unpack(out: str | Path) -> Path:
    """Build the cache folder from the repository's packed copy
    (float16 weights, seeded embedding rows)."""
    tensors, about = read_packed(BUNDLED["sieve-tiny"])
    recipe, cfg = about["recipe"], about["model_cfg"]
    model = _initial(cfg, recipe["seed"])
    rows, values = tensors.pop(f"{EMBEDDING}.rows"), tensors.pop(f"{EMBEDDING}.values")
    embedding = model.state_dict()[EMBEDDING].clone()
    embedding[rows] = values
    model.load_state_dict({**tensors, EMBEDDING: embedding})
    _save(
        Path(out),
        model,
        cfg,
        recipe,
        unpacked_from="models/weights/sieve-tiny.safetensors (float16)",
        **about.get("trained", {}),
    )
    return Path(out)


def _fit(
    model: Any,
    images: torch.Tensor,
    tokens: torch.Tensor,
    shapes: torch.Tensor,
    swap_tokens: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    hard_negatives: int,
    seed: int,
) -> list[float]:
    """The contrastive training loop (AdamW, warm-up then cosine); returns the per-step losses."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
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
    miner = NegativeMiner(swap_tokens.shape[1])
    n_samples = len(images)
    model.train()
    losses: list[float] = []
    bar = progress(range(steps), desc="training sieve-tiny")
    for step in bar:
        idx = torch.randint(0, n_samples, (batch_size,), generator=gen)
        img = _normalise(images[idx], mean, std)
        text = tokens[idx]
        if hard_negatives:
            neg_shapes = miner.pick(shapes[idx], hard_negatives, gen)  # (B, k)
            text = torch.cat([text, swap_tokens[idx[:, None], neg_shapes].flatten(0, 1)])
        img_f, txt_f, scale = model(img, text)
        # (B, B(1 + k)): each image also sees every shape-swapped caption
        logits = scale * img_f @ txt_f.t()
        labels = torch.arange(batch_size)
        if hard_negatives:
            with torch.no_grad():
                probs = logits.softmax(1)[:, batch_size:].view(
                    batch_size, batch_size, hard_negatives
                )
                miner.update(shapes[idx], neg_shapes, probs[labels, labels])
        loss = (
            torch.nn.functional.cross_entropy(logits, labels)
            + torch.nn.functional.cross_entropy(logits[:, :batch_size].t(), labels)
        ) / 2
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
    model.eval()
    return losses
