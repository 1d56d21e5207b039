"""The bundled watermark detector: a small CNN trained on generated scenes with text/logo overlays.

`train(out, **recipe)` writes `out/watermark_cnn.pt` and `out/train_info.json`; the cache
copy (`python -m models.train watermark`, or on first use by `load_scorer("watermark")`)
lives in `cache_dir()/watermark`. Training uses only the "train" overlay regime of
`models.overlays`, so the benchmark's held-out words, fonts and positions stay unseen.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.cache import BUNDLED, read_info, write_info
from models.overlays import make_example, regime_fonts
from models.packing import read_packed, write_packed
from models.runtime import isolated_torch, progress

log = logging.getLogger(__name__)
MODEL_FILE = "watermark_cnn.pt"
INPUT_SIZE = 64


class WatermarkCNN(nn.Module):
    """Five 3x3 conv blocks (three stride-2), global avg+max pool, one logit;
    input (n, 3, H, W) in [0, 1]."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        chans = [3, width // 2, width, width, 2 * width, 2 * width]
        strides = [2, 1, 2, 1, 2]
        layers: list[nn.Module] = []
        for cin, cout, stride in zip(chans, chans[1:], strides):
            layers += [
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * chans[-1], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features((x - 0.5) / 0.25)
        pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
        return self.head(pooled).squeeze(1)


def model_path() -> Path:
    """The cached detector's weights, trained first
    (child process, file lock) when missing or stale."""
    return BUNDLED["watermark"].ensure() / MODEL_FILE


def load(path: str | Path) -> tuple[WatermarkCNN, int]:
    """(detector in eval mode, its input size) from a `watermark_cnn.pt` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"watermark model not found: {path} (train one with "
            "`python -m models.train watermark --out DIR`, or omit model_path "
            "to use the cached default)"
        )
    blob = torch.load(path, map_location="cpu", weights_only=True)
    meta = blob.get("meta", {})
    model = WatermarkCNN(int(meta.get("width", 32)))
    model.load_state_dict(blob["state_dict"])
    return model.eval(), int(meta.get("input_size", INPUT_SIZE))


def make_batch(
    start: int, n: int, regime: str, seed: int, size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """n consecutive overlay examples as
    (float tensor (n, 3, size, size) in [0, 1], float labels (n,))."""
    images, labels = zip(*(make_example(i, regime, seed, size) for i in range(start, start + n)))
    x = torch.from_numpy(np.stack([np.asarray(im, np.float32) / 255.0 for im in images]))
    return x.permute(0, 3, 1, 2).contiguous(), torch.tensor(labels, dtype=torch.float32)


def train(
    out: str | Path,
    seed: int,
    steps: int,
    batch_size: int,
    pool: int,
    lr: float,
    width: int,
    size: int,
) -> Path:
    """Train the CNN on `pool` generated examples (fresh shifts each step); write it under `out`."""
    recipe = BUNDLED["watermark"].recipe(
        seed=seed, steps=steps, batch_size=batch_size, pool=pool, lr=lr, width=width, size=size
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with isolated_torch():
        torch.manual_seed(seed)
        xs, ys = [], []
        for s in progress(range(0, pool, 256), desc="watermark data", unit="x256"):
            x, y = make_batch(s, min(256, pool - s), "train", seed=1000 + seed, size=size)
            xs.append(x)
            ys.append(y)
        model = _fit(WatermarkCNN(width), torch.cat(xs), torch.cat(ys), steps, batch_size, lr, seed)
        threads = torch.get_num_threads()
    meta: dict[str, Any] = {
        "width": width,
        "input_size": size,
        "steps": steps,
        "seed": seed,
        "pool": pool,
        "batch_size": batch_size,
        "train_fonts": [Path(f).name for f in regime_fonts("train")],
        "seconds": round(time.time() - start, 1),
        "torch_threads": threads,
    }
    torch.save({"state_dict": model.state_dict(), "meta": meta}, out / MODEL_FILE)
    write_info(out, recipe, **meta)
    log.info("watermark model written to %s", out / MODEL_FILE)
    return out


def pack(folder: str | Path) -> Path:
    """Write a trained folder as the repository's packed copy
    (float16 weights, its recipe and facts)."""
    folder = Path(folder)
    blob = torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True)
    info = read_info(folder)
    return write_packed(
        BUNDLED["watermark"], blob["state_dict"], {"recipe": info["recipe"], "meta": blob["meta"]}
    )


def unpack(out: str | Path) -> Path:
    """Build the cache folder from the repository's packed copy."""
    tensors, about = read_packed(BUNDLED["watermark"])
    model = WatermarkCNN(int(about["meta"]["width"]))
    model.load_state_dict(tensors)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {**about["meta"], "unpacked_from": "models/weights/watermark.safetensors (float16)"}
    torch.save({"state_dict": model.state_dict(), "meta": meta}, out / MODEL_FILE)
    write_info(out, about["recipe"], **meta)
    return out


def _fit(
    model: WatermarkCNN,
    x_all: torch.Tensor,
    y_all: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> WatermarkCNN:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=max(1, steps), pct_start=0.15
    )
    gen = torch.Generator().manual_seed(seed)
    model.train()
    bar = progress(range(steps), desc="watermark train", unit="step")
    for _ in bar:
        idx = torch.randint(0, len(x_all), (batch_size,), generator=gen)
        shift = [int(v) for v in torch.randint(-6, 7, (2,), generator=gen)]
        # positions beyond the regions drawn in
        x = torch.roll(x_all[idx], shifts=shift, dims=(2, 3))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()
