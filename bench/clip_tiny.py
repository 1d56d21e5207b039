"""Quality of the bundled offline CLIP on held-out generated pairs.

`python -m bench.clip_tiny [--spec sieve-tiny] [--n 2000] [--seed 777]` measures zero-shot colour
and shape accuracy (prompt ensembles over the other attribute) and text->image recall@10, where a
hit is an image whose true attributes match every attribute its caption names.
Writes bench/results/clip_tiny.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import write_results
from models.clip import Clip, load_clip, tiny_dir
from models.runtime import setup_logging
from models.scenes import COLORS, SHAPES, iter_samples, matches

GOALS = {"color_acc": 0.9, "shape_acc": 0.9, "t2i_recall_at_10": 0.8}
HELD_OUT_SEED = 777  # training draws from seed 1000 + its own seed: disjoint scenes


def _class_embeddings(
    enc: Clip, classes: list[str], others: list[str], template: str, first: str
) -> np.ndarray:
    """One embedding per class: the normalised mean over prompts naming each
    value of the other attribute."""
    out = []
    for c in classes:
        prompts = [
            template.format(**{first: c, ("shape" if first == "color" else "color"): o})
            for o in others
        ]
        e = enc.encode_texts(prompts).mean(0)
        out.append(e / np.linalg.norm(e))
    return np.stack(out)


def evaluate(enc: Clip, n: int = 2000, seed: int = HELD_OUT_SEED) -> dict[str, float]:
    """Colour / shape zero-shot accuracy and t2i recall@10 of encoder `enc` on n held-out pairs."""
    samples = list(iter_samples(n, size=64, seed=seed))
    img = enc.encode_images([s.image for s in samples])
    txt = enc.encode_texts([s.caption for s in samples])
    colors, shapes = list(COLORS), list(SHAPES)
    template = "a photo of a {color} {shape}"
    col_emb = _class_embeddings(enc, colors, shapes, template, "color")
    shp_emb = _class_embeddings(enc, shapes, colors, template, "shape")
    color_acc = float(
        np.mean(
            [colors[i] == s.attrs["color"] for i, s in zip((img @ col_emb.T).argmax(1), samples)]
        )
    )
    shape_acc = float(
        np.mean(
            [shapes[i] == s.attrs["shape"] for i, s in zip((img @ shp_emb.T).argmax(1), samples)]
        )
    )
    top10 = np.argsort(-(txt @ img.T), axis=1)[:, :10]
    hits = [
        any(matches(s.attrs, s.attrs["named"], samples[j].attrs) for j in row)
        for s, row in zip(samples, top10)
    ]
    return {
        "color_acc": color_acc,
        "shape_acc": shape_acc,
        "t2i_recall_at_10": float(np.mean(hits)),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI: load (training on first use) the model, evaluate, write bench/results/clip_tiny.json."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--spec", default="sieve-tiny")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    a = p.parse_args(argv)
    setup_logging()
    t0 = time.time()
    enc = load_clip(a.spec, device="cpu")
    load_s = time.time() - t0
    t1 = time.time()
    figures = evaluate(enc, a.n, a.seed)
    payload: dict[str, Any] = {
        **figures,
        "goals": GOALS,
        "meets_goals": all(figures[k] >= v for k, v in GOALS.items()),
        "spec": a.spec,
        "n": a.n,
        "held_out_seed": a.seed,
        "load_or_train_seconds": round(load_s, 1),
        "eval_seconds": round(time.time() - t1, 1),
        "torch_threads": torch.get_num_threads(),
    }
    folder = tiny_dir() if a.spec == "sieve-tiny" else Path(a.spec.partition(":")[2])
    if (folder / "train_info.json").is_file():
        payload["training"] = json.loads((folder / "train_info.json").read_text())
    if (folder / "open_clip_config.json").is_file():
        payload["model_cfg"] = json.loads((folder / "open_clip_config.json").read_text())[
            "model_cfg"
        ]
    path = write_results("clip_tiny", payload)
    print(json.dumps(figures, indent=2), "->", path)
    return payload


if __name__ == "__main__":
    main()
