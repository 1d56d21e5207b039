"""The numbers behind a concept fitted from people's labels (`curation.concept_probe` reads the
collection and saves the result; this module only sees arrays).

People label the way a search shows them: the true ones on the first page 👍 and the near misses
beside them 👎. Such labels cannot say what lies outside that page, so the fit adds three things
they lack:
- the collection's unlabelled samples (a random sample): the scale every signal is measured on,
  the base rate, and the threshold;
- the prompt as a prior: its similarities start from a positive weight (`PROMPT_PRIOR`) that the
  labels adjust, scaled by how well the labels' own direction agrees with the prompt over the
  unlabelled sample (a prompt the labels contradict, e.g. one whose top is near misses, starts
  from nothing);
- a calibrated threshold: the held-out positives' ranks among the unlabelled samples (pooled
  over `CAL_REPEATS` splits of the labels) estimate the base rate (the smallest share of the
  collection that can hold the positives) and the precision of what passes each threshold; the
  threshold is the one with the best estimated F1, widened to the positives' 90% quantile (a
  search's easiest ones), its precision bounded by the held-out near misses it passes; one
  short of `TARGET_PRECISION` narrows to one that reaches it, or the grade says none does.

The grade is the cross-validated AUROC on the labels, capped where a held-out check fails: a
concept that ranks the labels below its own prompt, passes most of the collection, or passes
mostly false ones is not "good", and the grade says why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

log = logging.getLogger(__name__)

#: regularisation (sklearn's C) of the block probes and of the stacker
BLOCK_C = 1.0
STACK_C = 1.0
#: a prompt similarity's starting weight (per standard deviation over the collection) when the
#: labels' own direction agrees with it fully (`python -m bench.insight --only search_concepts`)
PROMPT_PRIOR = 4.0
#: labelled AUROC a score column needs to enter the probe (either sign)
MIN_SIGNAL_AUROC = 0.75
#: the suffix of a block's centroid probe (`block_probe`)
CENTROID = "~centroid"
#: the probes fitted per embedding block; the stacker weighs them by their held-out outputs
BLOCK_PROBES: tuple[str, ...] = ("", CENTROID)
#: cross-validation folds at most (fewer when a class has fewer labels)
MAX_FOLDS = 5
#: quality grades by cross-validated AUROC, best first
GRADES: tuple[tuple[float, str], ...] = (
    (0.95, "excellent"),
    (0.85, "good"),
    (0.7, "fair"),
    (0.0, "poor"),
)
#: the grade a concept keeps at most when a held-out check fails
CAPPED = "fair"
#: a concept passing more than this share of the collection is not "good"
MOST = 0.5
#: an estimated precision of what passes below this is not "good"
MIN_PRECISION = 0.5
#: share of held-out positives a cut must keep to bound the base rate
BASE_RATE_RECALL = 0.5
#: positives all ranked within this top share of the prompt's own ranking come from one search
SEARCH_TOP = 0.05
#: share of the held-out positives the threshold keeps at least (`calibrate`)
PASS_RECALL = 0.9
#: the estimated precision a threshold aims at: a margin over the 0.8 people expect of what
#: passes, as the estimate moves with the labels held out (`calibrate`)
TARGET_PRECISION = 0.9
#: repeated cross-validation splits whose held-out ranks the calibration pools: one split's
#: threshold moved with which labels it held out
CAL_REPEATS = 3
#: positives below which a grade is at most CAPPED (the AUROC of so few is mostly chance)
MIN_POSITIVES = 5


@dataclass
class Signals:
    """Features of some samples: embedding blocks (rows × dim) and fixed per-sample signals
    (prompt similarities `prompt_*`, score columns `column:*`)."""

    blocks: dict[str, np.ndarray]
    fixed: dict[str, np.ndarray]

    def rows(self, rows: np.ndarray) -> "Signals":
        return Signals(
            {k: v[rows] for k, v in self.blocks.items()},
            {k: v[rows] for k, v in self.fixed.items()},
        )

    def __len__(self) -> int:
        return len(next(iter(self.blocks.values())))


def block_probe(
    x: np.ndarray, y: np.ndarray, kind: str = "", c: float = BLOCK_C
) -> tuple[np.ndarray, float]:
    """One probe of an embedding block -> (weights, bias): a balanced logistic regression
    (`kind` ""), or the positives' mean direction (`CENTROID`: similarity to the examples, as
    the prompt is similarity to a text; the near misses do not move it)."""
    if kind == CENTROID:
        w = x[y == 1].mean(axis=0)
        return w / max(float(np.linalg.norm(w)), 1e-12), 0.0
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=2000)
    model.fit(x, y)
    return model.coef_[0].astype(np.float64), float(model.intercept_[0])


def stack(
    x: np.ndarray,
    y: np.ndarray,
    bounds: list[tuple[float | None, float | None]],
    prior: np.ndarray | None = None,
    c: float = STACK_C,
) -> tuple[np.ndarray, float]:
    """Class-balanced logistic regression, L2-regularised towards `prior` (default zero), with
    bounds on the weights (not the bias)."""
    prior = np.zeros(x.shape[1]) if prior is None else prior
    w_class = np.where(
        y == 1, len(y) / (2.0 * max(y.sum(), 1)), len(y) / (2.0 * max(len(y) - y.sum(), 1))
    )
    sign = 2.0 * y - 1.0

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:-1], theta[-1]
        z = sign * (x @ w + b)
        d = w - prior
        value = float((w_class * np.logaddexp(0.0, -z)).sum() + 0.5 / c * (d @ d))
        g = -w_class * sign * (1.0 - expit(z))  # d loss / d logit
        return value, np.concatenate([x.T @ g + d / c, [g.sum()]])

    start = np.concatenate([prior, [0.0]])
    result = minimize(
        loss, start, jac=True, method="L-BFGS-B", bounds=list(bounds) + [(None, None)]
    )
    return result.x[:-1], float(result.x[-1])


def folds(y: np.ndarray, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds of the labels ([] when a class has fewer than 2)."""
    k = min(MAX_FOLDS, int(min(y.sum(), len(y) - y.sum())))
    if k < 2:
        return []
    return list(
        StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)
    )


def evident(values: np.ndarray, y: np.ndarray) -> bool:
    """Whether a score column separates the labels well enough (either sign) to be weighed: with
    twenty labels the stacker would otherwise fit its chance correlations."""
    auc = float(roc_auc_score(y, values))
    return max(auc, 1.0 - auc) >= MIN_SIGNAL_AUROC


def modality_of(probe: str) -> str:
    """The embedding block a block probe reads ("image" for "image" and "image~centroid")."""
    return probe.partition("~")[0]


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() < 1e-12 or b.std() < 1e-12:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def fit_stack(
    lab: Signals, y: np.ndarray, unl: Signals, seed: int
) -> tuple[dict[str, Any], dict[str, float]]:
    """Stacked probe -> (linear model {block: (w, b) under "blocks", signal: (weight, mean, std),
    "bias"}, report {signal weights, prompt agreement}). `unl` (unlabelled samples) sets each
    signal's scale and the prompt prior; it is never given a label."""
    fixed = {f: v for f, v in lab.fixed.items() if f.startswith("prompt_") or evident(v, y)}
    probes = [b + kind for b in lab.blocks for kind in BLOCK_PROBES]
    names = probes + list(fixed)
    train = np.zeros((len(y), len(names)))
    other = np.zeros((len(unl), len(names)))
    split = folds(y, seed)
    blocks = {}
    for k, p in enumerate(probes):
        x, kind = lab.blocks[modality_of(p)], p[len(modality_of(p)) :]
        blocks[p] = block_probe(x, y, kind)
        if split:  # held-out outputs: a block that only memorised the labels earns no weight
            for tr, te in split:
                w, c = block_probe(x[tr], y[tr], kind)
                train[te, k] = x[te] @ w + c
        else:
            train[:, k] = x @ blocks[p][0] + blocks[p][1]
        other[:, k] = unl.blocks[modality_of(p)] @ blocks[p][0] + blocks[p][1]
    for k, f in enumerate(fixed, start=len(probes)):
        train[:, k], other[:, k] = fixed[f], unl.fixed[f]
    scale = other if len(unl) >= 10 else train  # the collection's scale where there is one
    mean, std = scale.mean(axis=0), scale.std(axis=0)
    std = np.where(std > 1e-9, std, 1.0)
    train, other = (train - mean) / std, (other - mean) / std
    # a probe's output and the prompt can only speak for the concept (a negative weight would
    # be fitting noise); a score column may count either way
    bounds = [(None, None) if n.startswith("column:") else (0.0, None) for n in names]
    prompts = [k for k, n in enumerate(names) if n.startswith("prompt_")]
    prior = np.zeros(len(names))
    agreement: dict[str, float] = {}
    if prompts and len(unl) >= 10:
        keep = [k for k in range(len(names)) if k not in prompts]
        w, _ = stack(train[:, keep], y, [bounds[k] for k in keep])
        own = other[:, keep] @ w  # the labels' own direction over the unlabelled samples
        for k in prompts:
            agreement[names[k]] = round(_agreement(own, other[:, k]), 4)
            prior[k] = PROMPT_PRIOR * max(0.0, agreement[names[k]])
    s, bias = stack(train, y, bounds, prior)
    model: dict[str, Any] = {"bias": bias, "blocks": blocks}
    for k, name in enumerate(names):
        model[name] = (float(s[k]), float(mean[k]), float(std[k]))
    report = {name: round(float(s[k]), 4) for k, name in enumerate(names)}
    report.update({f"agreement:{n}": a for n, a in agreement.items()})
    return model, report


def linear_scores(model: dict[str, Any], feats: Signals) -> np.ndarray:
    """Logits of a fitted stack on some samples' signals."""
    logit = np.full(len(feats), model["bias"])
    for p, (w, c) in model["blocks"].items():
        s, mu, sd = model[p]
        logit += s * ((feats.blocks[modality_of(p)] @ w + c) - mu) / sd
    for f, v in feats.fixed.items():
        if f in model:  # a column without evidence was left out
            s, mu, sd = model[f]
            logit += s * (v - mu) / sd
    return logit


def _above(values: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """For each cut, the share of values at or above it."""
    ordered = np.sort(values)
    return 1.0 - np.searchsorted(ordered, cuts, side="left") / max(len(ordered), 1)


def _precision(
    tails: np.ndarray, recall: np.ndarray, base: float, near: np.ndarray | None
) -> np.ndarray:
    """Per cut (each sorted positive tail) the estimated precision under a base rate, at most
    the share of positives among the held-out labels it passes (`near`: near misses' tails)."""
    precision = np.minimum(1.0, base * recall / tails)
    if near is not None and len(near):
        kept = recall * len(tails)
        missed = np.searchsorted(np.sort(near), tails, side="right")
        precision = np.minimum(precision, kept / (kept + missed))
    return precision


def calibrate(
    tails: np.ndarray, near_misses: np.ndarray | None = None, target: float | None = None
) -> dict[str, Any]:
    """Base rate, share to pass and its precision from the held-out positives' tail fractions
    (the share of unlabelled samples scoring at least as high as each positive: one row per
    split of the labels, each positive once per row, pooled) and, where given, the held-out
    negatives' (`near_misses`, pooled likewise).

    A cut passing a share q of the collection keeps a share R(q) of the positives, so the
    collection holds at most q / R(q) positives: the smallest such bound over cuts keeping at
    least half the positives is the base rate, and the precision at q is base rate × R(q) / q.
    The share to pass is the one with the best estimated F1, widened to the positives'
    `PASS_RECALL` quantile (interpolated between the two positives around it, so one outlying
    positive does not set the cut; the median over splits): positives labelled from a search's
    first page are its easiest ones, so a cut that would drop some of them drops far more of
    the positives the search did not show. Its precision is then measured against the bound of
    the cuts at least as wide, the narrowest ones being the most biased by those easiest
    positives, and at most the share of positives among the held-out labels the cut passes:
    near misses that pass are the false ones a page of what passes would show.

    With a `target` precision, a cut whose estimate falls short narrows to the widest cut
    (keeping `BASE_RATE_RECALL` of the positives) whose estimate, under the smallest bound,
    reaches it; where none does, to the narrowest such cut, and "reached" says so.
    """
    splits = np.clip(np.atleast_2d(tails), 1e-6, 1.0)
    tails = np.sort(splits.ravel())
    recall = np.arange(1, len(tails) + 1) / len(tails)
    ok = recall >= BASE_RATE_RECALL
    bound = np.where(ok, tails / recall, np.inf)
    first = float(np.min(bound))
    f1_precision = _precision(tails, recall, first, None)
    f1 = 2 * f1_precision * recall / np.maximum(f1_precision + recall, 1e-9)
    best = int(np.argmax(f1))
    cut, kept, base = float(tails[best]), float(recall[best]), first
    # each split's PASS_RECALL quantile of its positives' tails, interpolated between the
    # positive below it and the one reaching it (one outlying positive does not set the cut),
    # and the median over splits
    wide = float(
        np.median(
            [np.quantile(row, PASS_RECALL, method="interpolated_inverted_cdf") for row in splits]
        )
    )
    if wide > cut and recall[best] < PASS_RECALL:
        cut, kept = wide, PASS_RECALL
        at = min(int(np.searchsorted(tails, wide)), len(tails) - 1)
        base = max(first, min(float(np.min(bound[at:])), cut / kept))
    estimate = min(1.0, base * kept / cut)
    if near_misses is not None and len(near_misses):
        missed = float(np.count_nonzero(near_misses <= cut))
        estimate = min(estimate, kept * len(tails) / (kept * len(tails) + missed))
    reached = target is None or estimate >= target
    if not reached:
        assert target is not None
        precision = _precision(tails, recall, first, near_misses)
        narrower = ok & (tails <= cut)
        fits = np.nonzero(narrower & (precision >= target))[0]
        # none reaches it: the narrowest cut that still keeps half the positives, so what
        # passes is the least mixed the labels can show
        k = int(fits[-1]) if len(fits) else int(np.argmax(ok))
        reached = bool(len(fits))
        cut, kept, base = float(tails[k]), float(recall[k]), first
        estimate = float(precision[k])
    return {
        "base_rate": base,
        "passed": cut,
        "precision": estimate,
        "recall": kept,
        "reached": reached,
    }


def short_of_target(quality: dict[str, Any]) -> str:
    """Why a threshold claims less than its target: no cut's estimated precision reached it."""
    return (
        f"no threshold's estimated precision reaches {quality['target_precision']:.0%} "
        f"(at best {quality['estimated_precision']:.0%}): what passes is mixed"
    )


def grade_quality(quality: dict[str, Any]) -> tuple[str, list[str]]:
    """The grade by cross-validated AUROC, at most `CAPPED` with a reason per failed check."""
    grade = next(g for limit, g in GRADES if quality["cv_auroc"] >= limit)
    reasons = []
    prompt = quality.get("prompt_auroc")
    if prompt is not None and quality["cv_auroc"] < prompt - 0.01:
        reasons.append(
            f"ranks the held-out labels below its own prompt "
            f"(AUROC {quality['cv_auroc']:.3f} vs {prompt:.3f})"
        )
    if quality["passed_fraction"] > MOST:
        reasons.append(f"passes {quality['passed_fraction']:.0%} of the collection")
    if quality["estimated_precision"] < MIN_PRECISION:
        reasons.append(
            f"estimated precision of what passes is {quality['estimated_precision']:.0%}"
        )
    if quality.get("target_reached") is False:
        reasons.append(short_of_target(quality))
    if quality["n_positive"] < MIN_POSITIVES:
        reasons.append(f"only {quality['n_positive']} positive labels: label more")
    order = [g for _, g in GRADES]
    if reasons and order.index(grade) < order.index(CAPPED):
        grade = CAPPED
    return grade, reasons


def _positive_folds(y: np.ndarray, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Folds holding out positives only, every negative kept in training: with a single
    negative label a threshold can still be calibrated, though nothing can be graded."""
    pos = np.nonzero(y == 1)[0]
    k = min(MAX_FOLDS, len(pos))
    if k < 2 or not (y == 0).any():
        return []
    parts = np.array_split(np.random.default_rng(seed).permutation(pos), k)
    return [(np.setdiff1d(np.arange(len(y)), part), np.sort(part)) for part in parts]


def _notes(lab: Signals, y: np.ndarray, unl: Signals) -> list[str]:
    """What the grade cannot show: positives that all come from the top of the prompt's own
    ranking (a search's first page) calibrate a threshold that may pass too few."""
    notes = []
    for f in ("prompt_image", "prompt_text"):
        if f in lab.fixed and f in unl.fixed:
            top = float(_above(unl.fixed[f], lab.fixed[f][y == 1]).max())
            if top <= SEARCH_TOP:
                notes.append(
                    f"every positive ranks in the prompt's top {top:.2%} ({f}): the threshold "
                    f"may pass too few; label the suggestions near it"
                )
                break
    return notes


def grade_fit(
    lab: Signals, y: np.ndarray, unl: Signals, final: np.ndarray, seed: int
) -> tuple[float, dict[str, Any]]:
    """Threshold (a logit) and the quality shown by held-out checks: cross-validated AUROC on
    the labels beside the prompt's own, and the calibration of `calibrate` on the unlabelled
    samples' logits under the final model (`final`)."""
    counts = {"n_positive": int(y.sum()), "n_negative": int(len(y) - y.sum())}
    split = folds(y, seed + 1)
    graded = bool(split)
    split = split or _positive_folds(y, seed + 1)
    if not split or len(unl) < 10:
        reason = (
            "fewer than 2 positive labels: nothing to hold out"
            if not split
            else "fewer than 10 unlabelled samples: nothing to calibrate on"
        )
        return 0.0, {  # the stacker's own balanced boundary
            "grade": "unknown",
            "reason": reason,
            "reasons": [reason],
            **counts,
        }
    again = [
        folds(y, seed + 1 + r) or _positive_folds(y, seed + 1 + r) for r in range(1, CAL_REPEATS)
    ]
    pos_tails, neg_tails = [], []
    for r, splits in enumerate([split, *again]):
        scores, tails = np.zeros(len(y)), np.ones(len(y))
        for train, test in splits:
            model, _ = fit_stack(lab.rows(train), y[train], unl, seed)
            scores[test] = linear_scores(model, lab.rows(test))
            tails[test] = np.maximum(_above(linear_scores(model, unl), scores[test]), 1 / len(unl))
        tested = np.zeros(len(y), dtype=bool)
        tested[np.concatenate([test for _, test in splits])] = True  # a lone negative never is
        if r == 0:  # the grade's AUROC: the first split's held-out scores
            held = scores
        pos_tails.append(tails[y == 1])
        neg_tails.append(tails[(y == 0) & tested])
    cal = calibrate(np.stack(pos_tails), np.concatenate(neg_tails), TARGET_PRECISION)
    ranked = np.sort(final)[::-1]
    k = max(1, min(len(ranked), int(round(cal["passed"] * len(ranked)))))
    threshold = float((ranked[k - 1] + ranked[k]) / 2) if k < len(ranked) else float(ranked[-1])
    prompts = [roc_auc_score(y, v) for f, v in lab.fixed.items() if f.startswith("prompt_")]
    q: dict[str, Any] = {
        "prompt_auroc": round(float(max(prompts)), 4) if prompts and graded else None,
        "cv_folds": len(split),
        "estimated_precision": round(cal["precision"], 4),
        "estimated_recall": round(cal["recall"], 4),
        "estimated_base_rate": round(cal["base_rate"], 4),
        "target_precision": TARGET_PRECISION,
        "target_reached": cal["reached"],
        "passed_fraction": round(float((final >= threshold).mean()), 4),
        "unlabelled_sample": len(unl),
        **counts,
    }
    if graded:  # ungraded, "cv_auroc" is absent rather than None (callers test for the key)
        q["cv_auroc"] = round(float(roc_auc_score(y, held)), 4)
        q["grade"], q["reasons"] = grade_quality(q)
    else:
        q["grade"] = "unknown"
        q["reason"] = (
            f"only {counts['n_negative']} negative label: nothing to grade against; "
            f"label a near miss or two"
        )
        q["reasons"] = [q["reason"]]
        if not cal["reached"]:
            q["reasons"].append(short_of_target(q))
    q["notes"] = _notes(lab, y, unl)
    return threshold, q
