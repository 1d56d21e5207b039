"""Watermark detector benchmark: AUROC on overlays whose words, fonts and positions the
detector never saw in training (`models.overlays` "heldout" regime).

`python -m bench.watermark [--steps N] [--n-eval N] [--model PATH]` trains the bundled CNN
from scratch (unless --model is given), then scores held-out overlays, in-distribution
overlays, and the sample generator's own watermarked shards side by side, and writes
`bench/results/watermark.json` (key `auroc`: held-out).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import write_results
from models.cache import BUNDLED
from models.overlays import HELDOUT_WORDS, REGIONS, make_example, regime_fonts, regime_words
from models.runtime import setup_logging
from models.scenes import iter_samples
from models.watermark_cnn import MODEL_FILE, train
from pipelines.scorers import load_scorer


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney rank statistic (ties get mean ranks)."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, np.float64)
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if not n_pos or not n_neg:
        raise ValueError("AUROC needs both classes")
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _evaluate(scorer: Any, images: list, labels: list[int]) -> dict[str, float]:
    start = time.time()
    scores = scorer.score(images)
    seconds = time.time() - start
    labels_arr = np.asarray(labels)
    return {
        "auroc": round(auroc(labels_arr, scores), 4),
        "n": len(labels),
        "accuracy_at_0.5": round(float(((scores > 0.5) == labels_arr.astype(bool)).mean()), 4),
        "images_per_s": round(len(images) / seconds, 1),
    }


def run(
    steps: int | None = None, n_eval: int = 2000, model: str | None = None, seed: int = 0
) -> dict[str, Any]:
    """Train (unless `model` names a watermark_cnn.pt file) and score the three evaluation sets."""
    result: dict[str, Any] = {}
    if model is None:
        tmp = tempfile.mkdtemp(prefix="sieve-wm-bench-")
        start = time.time()
        recipe = {**BUNDLED["watermark"].defaults, "seed": seed}
        if steps:
            recipe["steps"] = steps
        model = str(train(tmp, **recipe) / MODEL_FILE)
        result["train_seconds"] = round(time.time() - start, 1)
    blob = torch.load(model, map_location="cpu", weights_only=True)
    result["model_meta"] = blob.get("meta", {})
    scorer = load_scorer("watermark", model_path=model)
    held = [make_example(i, "heldout", seed=5000 + seed) for i in range(n_eval)]
    train_like = [make_example(i, "train", seed=6000 + seed) for i in range(n_eval)]
    shards = list(iter_samples(n_eval, seed=7000 + seed, watermark_fraction=0.5))
    result["heldout"] = _evaluate(scorer, [x for x, _ in held], [y for _, y in held])
    result["in_distribution"] = _evaluate(
        scorer, [x for x, _ in train_like], [y for _, y in train_like]
    )
    result["sample_shards"] = _evaluate(
        scorer, [s.image for s in shards], [int(s.attrs["watermark"]) for s in shards]
    )
    result["auroc"] = result["heldout"]["auroc"]
    result["regimes"] = {
        "train": {
            "words": regime_words("train"),
            "fonts": [Path(f).name for f in regime_fonts("train")],
            "regions_xyxy": REGIONS["train"],
        },
        "heldout": {
            "words": HELDOUT_WORDS,
            "fonts": [Path(f).name for f in regime_fonts("heldout")],
            "regions_xyxy": REGIONS["heldout"],
        },
        "sample_shards": "models.scenes defaults: WATERMARK_WORDS, default font, anywhere",
    }
    result["note"] = (
        "held-out words, fonts and anchor regions are disjoint from training; "
        "in_distribution and sample_shards are for comparison only"
    )
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.watermark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps (default: the bundled recipe's, models.cache.BUNDLED['watermark'])",
    )
    parser.add_argument("--n-eval", type=int, default=2000)
    parser.add_argument(
        "--model", default=None, help="score an existing model file instead of training"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    setup_logging()
    result = run(args.steps, args.n_eval, args.model, args.seed)
    path = write_results("watermark", result)
    print(
        f"auroc (held-out) {result['auroc']}  in-distribution "
        f"{result['in_distribution']['auroc']}  "
        f"sample shards {result['sample_shards']['auroc']} -> {path}"
    )


if __name__ == "__main__":
    main()
