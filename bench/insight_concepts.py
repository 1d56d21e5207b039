"""Concepts labelled the way people label (`python -m bench.insight --only search_concepts`):
a text search's first page, the true ones 👍 and the near misses beside them 👎.

For each concept of the generated data (shape+colour, count, background kind, watermarked,
noisy background, a shape): the prompt's top `PAGE` samples by image similarity (what the
Search page shows), the first `LABELS` true ones as positives and the first `LABELS` false ones
as negatives. AUROC on every other sample for zero-shot (the prompt's similarity to the image),
Lilac's recipe (balanced logistic regression on the labelled caption embeddings; `lilac_image`:
on the image embeddings) and Sieve (`curation.concept_probe.fit_concept` with the prompt), and
for Sieve's threshold the measured precision and share of what passes beside its estimates and
the true share (`concept_auroc_search_labels`); `after_suggestions`: the same once the `ROUND`
samples `suggest_rows` offers next are labelled by the truth and the concept refitted.

Beside them, what the embeddings allow: `ceiling_auroc`, a logistic regression trained on every
sample's true label (out of fold) over the features Sieve's probe reads (image and text
embeddings, score columns; `ceiling_auroc_image`: image alone), and
`most_passed_at_goal_precision`, the largest share any threshold on Sieve's score passes at a
measured precision of `GOAL_PRECISION` (what a perfectly calibrated threshold would pass).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from collection import schema as S
from collection.embeddings import EmbeddingStore
from collection.parts import read_metadata
from curation.concept_probe import SCORE_COLUMNS, fit_concept, score_collection, suggest_rows
from models.clip import load_clip

log = logging.getLogger("bench.insight")

#: name -> (prompt, truth): the truth is a pandas query over the generated samples' json
SEARCH_CONCEPTS: dict[str, tuple[str, str]] = {
    "red_circle": ("a red circle", "shape == 'circle' and color == 'red'"),
    "three_shapes": ("three shapes", "count == 3"),
    "gradient_background": ("a shape on a gradient background", "background == 'gradient'"),
    "watermarked": ("a picture with a watermark", "watermark"),
    "noisy_background": ("noisy background", "background == 'noise'"),
    "star": ("a star", "shape == 'star'"),
}
#: the search page a person labels from, and the labels of each kind they give at most
PAGE = 60
LABELS = 10
#: suggestions labelled in the one round of the labelling loop measured
ROUND = 10
#: the goals of issue 25
GOAL_AUROC = 0.95
GOAL_PRECISION = 0.8


def search_labels(
    img: np.ndarray, prompt_vec: np.ndarray, truth: np.ndarray, page: int = PAGE, n: int = LABELS
) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative ids as a person gives them from a search's first page, in rank
    order: up to n true ones and up to n near misses."""
    top = np.argsort(-(img @ prompt_vec), kind="stable")[:page]
    return top[truth[top]][:n], top[~truth[top]][:n]


def _auroc(truth: np.ndarray, scores: np.ndarray, rest: np.ndarray) -> float:
    return round(float(roc_auc_score(truth[rest], scores[rest])), 4)


def _lilac(x: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    model = LogisticRegression(class_weight="balanced", max_iter=5000)
    model.fit(x[np.r_[pos, neg]], y)
    return x @ model.coef_[0]


def ceiling(x: np.ndarray, truth: np.ndarray, folds: int = 5) -> float:
    """What a linear probe of these features can reach: the out-of-fold AUROC of a logistic
    regression trained on every sample's true label (a concept's goal above it is out of reach
    of any probe of these embeddings, whatever the labels)."""
    split = StratifiedKFold(folds, shuffle=True, random_state=0)
    model = LogisticRegression(max_iter=5000)
    out = cross_val_predict(model, x, truth, cv=split, method="decision_function")
    return round(float(roc_auc_score(truth, out)), 4)


def most_passed(truth: np.ndarray, scores: np.ndarray, precision: float) -> float:
    """The largest share of samples any threshold on `scores` passes at a measured precision of
    at least `precision` (0 where none does): what a perfectly calibrated threshold passes."""
    hits = np.cumsum(truth[np.argsort(-scores, kind="stable")])
    ok = np.nonzero(hits / np.arange(1, len(hits) + 1) >= precision)[0]
    return round(float((ok[-1] + 1) / len(hits)), 4) if len(ok) else 0.0


def _fit_and_measure(
    collection: str,
    keys: np.ndarray,
    truth: np.ndarray,
    rest: np.ndarray,
    name: str,
    prompt: str,
    pos: np.ndarray,
    neg: np.ndarray,
    clip: Any,
) -> tuple[Any, dict[str, Any]]:
    """Fit Sieve's concept on the labels; its AUROC, threshold figures and quality on `rest`."""
    concept = fit_concept(
        collection,
        f"bench-search-{name}",
        list(keys[pos]),
        list(keys[neg]),
        prompt=prompt,
        clip=clip,
    )
    scores = score_collection(collection, concept)
    passed = scores[rest] >= concept.threshold
    q = concept.quality
    return concept, {
        "auroc": _auroc(truth, scores, rest),
        "precision_above_threshold": round(float(truth[rest][passed].mean()), 4)
        if passed.any()
        else None,
        "passed_fraction": round(float(passed.mean()), 4),
        "most_passed_at_goal_precision": most_passed(truth[rest], scores[rest], GOAL_PRECISION),
        "estimated_precision": q.get("estimated_precision"),
        "estimated_passed_fraction": q.get("passed_fraction"),
        "estimated_base_rate": q.get("estimated_base_rate"),
        "grade": q.get("grade"),
        "reasons": q.get("reasons", []),
        "notes": q.get("notes", []),
        "cv_auroc": q.get("cv_auroc"),
        "prompt_auroc_labels": q.get("prompt_auroc"),
    }


def one_concept(
    collection: str,
    meta: Any,
    img: np.ndarray,
    txt: np.ndarray,
    cols: np.ndarray,
    clip: Any,
    name: str,
    prompt: str,
    rule: str,
) -> dict[str, Any]:
    """The figures of one concept (see the module doc)."""
    keys = meta[S.KEY].to_numpy()
    # "watermark" is a bool column: pandas' eval would not make it a mask of the rows
    truth = (
        meta["watermark"].astype(bool).to_numpy()
        if rule == "watermark"
        else meta.eval(rule).to_numpy().astype(bool)
    )
    vec = np.asarray(clip.encode_texts([prompt])[0], dtype=np.float64)
    vec /= np.linalg.norm(vec)
    pos, neg = search_labels(img, vec, truth)
    rest = np.setdiff1d(np.arange(len(truth)), np.r_[pos, neg])
    out: dict[str, Any] = {
        "prompt": prompt,
        "truth": rule,
        "true_fraction": round(float(truth.mean()), 4),
        "positives": len(pos),
        "negatives": len(neg),
        "auroc": {"zero_shot": _auroc(truth, img @ vec, rest)},
        "ceiling_auroc": ceiling(np.hstack([img, txt, cols]), truth),
        "ceiling_auroc_image": ceiling(img, truth),
    }
    if len(pos) == 0 or len(neg) == 0:
        out["skipped"] = (
            f"the first {PAGE} results hold no {'true' if not len(pos) else 'false'} one"
        )
        return out
    out["auroc"]["lilac"] = _auroc(truth, _lilac(txt, pos, neg), rest)
    out["auroc"]["lilac_image"] = _auroc(truth, _lilac(img, pos, neg), rest)
    concept, figures = _fit_and_measure(collection, keys, truth, rest, name, prompt, pos, neg, clip)
    out["auroc"]["sieve"] = figures.pop("auroc")
    out.update(figures)
    rows = suggest_rows(concept, keys, score_collection(collection, concept), ROUND)
    more = np.array([r["id"] for r in rows], dtype=np.int64)
    pos2, neg2 = np.r_[pos, more[truth[more]]], np.r_[neg, more[~truth[more]]]
    rest2 = np.setdiff1d(rest, more)
    _, after = _fit_and_measure(collection, keys, truth, rest2, name, prompt, pos2, neg2, clip)
    out["after_suggestions"] = {
        "labelled": len(pos2) + len(neg2),
        "new_positives": int(truth[more].sum()),
        **after,
    }
    goal = max(out["auroc"]["zero_shot"], GOAL_AUROC)
    precision = out["precision_above_threshold"]
    out["goals_met"] = {
        "auroc": out["auroc"]["sieve"] >= goal,
        "precision": precision is not None and precision >= GOAL_PRECISION,
        # no probe of these features reaches a goal above the ceiling, whatever the labels
        "auroc_within_ceiling": goal <= out["ceiling_auroc"],
    }
    return out


def run_search_concepts(collection: str) -> dict[str, Any]:
    """`concept_auroc_search_labels` on a generated, embedded collection (`bench.insight.data`)."""
    meta = read_metadata(collection).to_pandas()
    img, txt = (
        np.concatenate([a for _, a in EmbeddingStore.open(collection, m).iter_parts()]).astype(
            np.float64
        )
        for m in (S.MODALITY_IMAGE, S.MODALITY_TEXT)
    )
    # the score columns Sieve's probe may read, standardised (missing: the mean)
    cols = meta[[c for c in SCORE_COLUMNS if c in meta]].astype(float)
    cols = ((cols - cols.mean()) / cols.std().replace(0.0, 1.0)).fillna(0.0).to_numpy()
    clip = load_clip("sieve-tiny", device="cpu")
    per: dict[str, Any] = {}
    for name, (prompt, rule) in SEARCH_CONCEPTS.items():
        per[name] = one_concept(collection, meta, img, txt, cols, clip, name, prompt, rule)
        log.info("%s: %s", name, per[name])
    methods = ("zero_shot", "lilac", "lilac_image", "sieve")
    return {
        "concept_auroc_search_labels": {
            **{m: {c: r["auroc"].get(m) for c, r in per.items()} for m in methods},
            "precision_above_threshold": {
                c: r.get("precision_above_threshold") for c, r in per.items()
            },
            "passed_fraction": {c: r.get("passed_fraction") for c, r in per.items()},
            "most_passed_at_goal_precision": {
                c: r.get("most_passed_at_goal_precision") for c, r in per.items()
            },
            "estimated_base_rate": {c: r.get("estimated_base_rate") for c, r in per.items()},
            "true_fraction": {c: r["true_fraction"] for c, r in per.items()},
            "ceiling_auroc": {c: r["ceiling_auroc"] for c, r in per.items()},
            "ceiling_auroc_image": {c: r["ceiling_auroc_image"] for c, r in per.items()},
            "ceiling": "out-of-fold AUROC of a logistic regression trained on every sample's "
            "true label: image+text embeddings and score columns (ceiling_auroc_image: image "
            "alone)",
            "concepts": per,
            "samples": len(meta),
            "labels": f"a search's top {PAGE} by image similarity to the prompt: up to "
            f"{LABELS} true ones 👍 and {LABELS} near misses 👎, in rank order",
            "goals": {
                "auroc": f"sieve >= max(zero_shot, {GOAL_AUROC})",
                "precision": GOAL_PRECISION,
            },
        }
    }
