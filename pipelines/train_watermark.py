"""Train the bundled watermark detector on generated scenes with random text/logo overlays.

`python -m pipelines.train_watermark [--out DIR] [--seed S] [--steps N]` writes
`DIR/watermark_cnn.pt` (default DIR: `cache_dir()/watermark`, where `load_scorer("watermark")`
looks). Training uses only the "train" overlay regime of `pipelines.scorers.overlays`, so the
benchmark's held-out words, fonts and positions stay unseen. A few minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)
DEFAULT_STEPS = 600
DEFAULT_POOL = 4096


def train(out: str | Path | None = None, seed: int = 0, steps: int = DEFAULT_STEPS,
          batch_size: int = 64, pool: int = DEFAULT_POOL, lr: float = 3e-3, width: int = 32,
          size: int = 64) -> Path:
    """Train the CNN on `pool` generated examples (fresh flips/shifts each step); return the model file."""
    import torch
    from tqdm import tqdm

    from pipelines.scorers.overlays import make_batch, regime_fonts
    from pipelines.scorers.watermark import MODEL_FILE, build_cnn

    if out is None:
        from pipelines.cache import cache_dir
        out = cache_dir() / "watermark"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    start = time.time()
    xs, ys = [], []
    for s in tqdm(range(0, pool, 256), desc="watermark data", unit="x256"):
        x, y = make_batch(s, min(256, pool - s), "train", seed=1000 + seed, size=size)
        xs.append(x)
        ys.append(y)
    x_all, y_all = torch.cat(xs), torch.cat(ys)
    model = build_cnn(width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps), pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(range(steps), desc="watermark train", unit="step")
    for _ in bar:
        idx = torch.randint(0, len(x_all), (batch_size,), generator=gen)
        x = x_all[idx]
        shift = [int(v) for v in torch.randint(-6, 7, (2,), generator=gen)]
        x = torch.roll(x, shifts=shift, dims=(2, 3))  # positions beyond the regions drawn in
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    meta = {"width": width, "input_size": size, "steps": steps, "seed": seed, "pool": pool,
            "batch_size": batch_size, "train_fonts": [Path(f).name for f in regime_fonts("train")],
            "seconds": round(time.time() - start, 1), "torch_threads": torch.get_num_threads()}
    path = out / MODEL_FILE
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"state_dict": model.state_dict(), "meta": meta}, tmp)
    os.replace(tmp, path)
    log.info("watermark model written to %s (%s)", path, json.dumps(meta))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.train_watermark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="output folder (default: cache_dir()/watermark)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--pool", type=int, default=DEFAULT_POOL, help="generated training examples")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(train(args.out, args.seed, args.steps, args.batch_size, args.pool))


if __name__ == "__main__":
    main()
