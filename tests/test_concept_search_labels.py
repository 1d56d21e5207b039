"""Concepts labelled as people label (a search's first page, true ones 👍, near misses 👎): the
fit keeps to the true share, ranks no worse than its prompt, grades honestly, estimates the
precision of what passes, and suggests rows to label next."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from bench.insight_concepts import search_labels
from collection import schema as S
from collection.embeddings import EmbeddingStore
from collection.parts import read_metadata
from curation.concept_fit import (
    CENTROID,
    PASS_RECALL,
    block_probe,
    calibrate,
    grade_quality,
)
from curation.concept_probe import fit_concept, score_collection, suggest_rows


@pytest.fixture(scope="module")
def generated(insight_collection, tiny_clip) -> dict:
    coll = insight_collection["collection"]
    meta = read_metadata(coll, [S.KEY, "watermark", "shape", "color"]).to_pandas()
    img = np.concatenate(
        [a for _, a in EmbeddingStore.open(coll, S.MODALITY_IMAGE).iter_parts()]
    ).astype(np.float64)
    return {"collection": coll, "meta": meta, "img": img, "clip": tiny_clip}


def _search_fit(generated: dict, name: str, prompt: str, truth: np.ndarray, page: int) -> dict:
    vec = np.asarray(generated["clip"].encode_texts([prompt])[0], dtype=np.float64)
    vec /= np.linalg.norm(vec)
    pos, neg = search_labels(generated["img"], vec, truth, page=page, n=10)
    keys = generated["meta"][S.KEY].to_numpy()
    concept = fit_concept(
        generated["collection"],
        name,
        list(keys[pos]),
        list(keys[neg]),
        prompt=prompt,
        clip=generated["clip"],
    )
    scores = score_collection(generated["collection"], concept)
    rest = np.setdiff1d(np.arange(len(truth)), np.r_[pos, neg])
    return {
        "concept": concept,
        "scores": scores,
        "rest": rest,
        "zero_shot": generated["img"] @ vec,
        "labelled": len(pos) + len(neg),
    }


@pytest.mark.parametrize(
    "name,prompt,column,value",
    [("star", "a star", "shape", "star"), ("wm", "a picture with a watermark", "watermark", True)],
)
def test_near_miss_labels_keep_to_the_true_share_and_rank_no_worse_than_the_prompt(
    generated, name, prompt, column, value
):
    truth = (generated["meta"][column] == value).to_numpy()
    fit = _search_fit(generated, f"search-{name}", prompt, truth, page=40)
    concept, scores, rest = fit["concept"], fit["scores"], fit["rest"]
    passed = scores[rest] >= concept.threshold
    # the concept passed 91% of the collection; this one stays near the true share
    assert passed.mean() <= max(2 * truth.mean(), 0.3)
    assert concept.quality["passed_fraction"] <= max(2 * truth.mean(), 0.3)
    sieve = roc_auc_score(truth[rest], scores[rest])
    assert sieve >= roc_auc_score(truth[rest], fit["zero_shot"][rest]) - 0.02
    assert truth[rest][passed].mean() >= 0.6
    q = concept.quality
    assert q["grade"] in ("excellent", "good", "fair", "poor")
    assert {"estimated_precision", "estimated_base_rate", "prompt_auroc", "reasons"} <= set(q)


def _quality(**changes: object) -> dict:
    q = {
        "cv_auroc": 0.92,
        "prompt_auroc": 0.9,
        "passed_fraction": 0.1,
        "estimated_precision": 0.9,
        "n_positive": 10,
    }
    q.update(changes)
    return q


def test_the_grade_is_not_good_when_a_held_out_check_fails():
    assert grade_quality(_quality()) == ("good", [])
    grade, reasons = grade_quality(_quality(prompt_auroc=0.97))
    assert grade == "fair" and "below its own prompt" in reasons[0]
    grade, reasons = grade_quality(_quality(cv_auroc=0.99, passed_fraction=0.91))
    assert grade == "fair" and "passes 91% of the collection" in reasons[0]
    grade, reasons = grade_quality(_quality(estimated_precision=0.3))
    assert grade == "fair" and "precision" in reasons[0]
    grade, reasons = grade_quality(_quality(n_positive=3))
    assert grade == "fair" and "3 positive labels" in reasons[0]
    # a poor concept stays poor whatever else is said of it
    assert grade_quality(_quality(cv_auroc=0.6, passed_fraction=0.9))[0] == "poor"


@pytest.mark.parametrize("base", [0.05, 0.2, 0.4])
def test_the_estimated_precision_matches_the_measured_one_when_positives_are_a_fair_sample(base):
    rng = np.random.default_rng(1)
    n = 20_000
    truth = rng.random(n) < base
    logits = np.where(truth, rng.normal(2.0, 1.0, n), rng.normal(-2.0, 1.0, n))
    labelled = rng.choice(np.nonzero(truth)[0], 40, replace=False)
    others = np.sort(np.delete(logits, labelled))
    tails = 1.0 - np.searchsorted(others, logits[labelled]) / len(others)
    cal = calibrate(tails)
    cut = np.quantile(others, 1.0 - cal["passed"])
    kept = np.delete(logits, labelled) >= cut
    measured = np.delete(truth, labelled)[kept].mean()
    assert abs(cal["precision"] - measured) <= 0.15
    assert abs(cal["base_rate"] - base) <= 0.5 * base + 0.02


def test_the_threshold_keeps_most_of_a_search_pages_positives():
    """Positives from a search's first page rank at the very top when held out: the best-F1 cut
    alone kept half of them (and passed a tenth of the true share); at least PASS_RECALL pass."""
    tails = np.array([2e-4, 2e-4, 2e-4, 2e-4, 2e-4, 5e-4, 5e-4, 1e-3, 4.4e-3, 9e-3])
    cal = calibrate(tails)
    assert cal["recall"] >= PASS_RECALL
    assert (tails <= cal["passed"]).mean() >= PASS_RECALL
    assert cal["passed"] == pytest.approx(4.4e-3)
    # measured against the cuts at least that wide, not the narrowest ones
    assert cal["precision"] >= 0.5
    assert cal["base_rate"] >= cal["passed"] * cal["precision"] - 1e-12


def test_near_misses_that_pass_lower_the_estimated_precision():
    """Positives and near misses interleaved (gradient backgrounds): the bound alone said 1.0
    where half of what passed was false."""
    tails = np.array([1e-3, 5e-3, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    alone = calibrate(tails)
    mixed = calibrate(tails, np.array([2e-3, 0.02, 0.08, 0.15, 0.25, 0.35, 0.45, 0.55, 0.9]))
    assert mixed["passed"] == alone["passed"]
    assert mixed["precision"] == pytest.approx(9 / 16)
    assert mixed["precision"] < alone["precision"]
    # near misses that all rank below the cut leave the estimate as it was
    assert calibrate(tails, np.array([0.95, 0.99]))["precision"] == alone["precision"]


def test_one_outlying_positive_does_not_set_the_cut():
    """Nine positives, the last held out far below the rest (a watermark the probe missed):
    keeping 90% of nine meant keeping all nine, so that one positive's rank set a cut passing
    8% of the collection where the others all ranked in the top 1.3%."""
    tails = np.array([2e-4, 2e-4, 7e-4, 4.2e-3, 4.2e-3, 5.6e-3, 0.0122, 0.0134, 0.0815])
    cal = calibrate(tails)
    # the positives' 90% quantile, a tenth of the way from the eighth to the ninth
    assert cal["passed"] == pytest.approx(0.0134 + 0.1 * (0.0815 - 0.0134))
    assert cal["recall"] == pytest.approx(PASS_RECALL)
    # over repeated splits the median split's cut: one split's outlier does not move it
    splits = np.stack([tails, tails * 1.1, np.r_[tails[:-1], 0.5]])
    assert calibrate(splits)["passed"] == pytest.approx(1.1 * cal["passed"])


def test_a_threshold_short_of_the_target_precision_narrows_to_one_that_reaches_it():
    """Near misses passing the widest cut put its estimated precision at 2/3: the cut narrows
    to the widest one estimated at the target, and says so."""
    tails = np.array([0.01] * 5 + [0.02] * 5)
    near = np.array([0.015] * 5 + [0.5] * 5)
    assert calibrate(tails, near)["precision"] == pytest.approx(10 / 15)
    cal = calibrate(tails, near, target=0.9)
    assert cal["reached"] and cal["passed"] == 0.01 and cal["precision"] >= 0.9


def test_a_threshold_no_cut_of_which_reaches_the_target_says_so_and_passes_little():
    """Positives and near misses interleaved (gradient backgrounds): no cut is estimated at
    90%, so the threshold keeps to the narrowest that holds half the positives, and the grade
    gives the reason."""
    tails = np.array([1e-3, 5e-3, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    near = np.array([2e-3, 0.02, 0.08, 0.15, 0.25, 0.35, 0.45, 0.55, 0.9])
    cal = calibrate(tails, near, target=0.9)
    assert not cal["reached"]
    assert cal["passed"] == 0.1 and cal["recall"] == 0.5
    assert cal["precision"] == pytest.approx(5 / 8)
    grade, reasons = grade_quality(
        _quality(target_reached=False, target_precision=0.9, estimated_precision=0.6)
    )
    assert grade == "fair" and "reaches 90% (at best 60%)" in reasons[0]
    assert grade_quality(_quality(target_reached=True, target_precision=0.9)) == ("good", [])


def test_the_centroid_probe_is_the_positives_mean_direction():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 8))
    y = np.r_[np.ones(5), np.zeros(7)].astype(int)
    w, b = block_probe(x, y, CENTROID)
    mean = x[:5].mean(axis=0)
    assert b == 0.0 and np.allclose(w, mean / np.linalg.norm(mean))
    # near misses do not move it
    x2 = x.copy()
    x2[5:] += 3.0
    assert np.allclose(block_probe(x2, y, CENTROID)[0], w)


def test_the_estimated_precision_on_a_generated_set(generated):
    """Random labels (a fair sample of positives): the estimate is within 0.2 of what passes."""
    meta = generated["meta"]
    truth = meta["watermark"].astype(bool).to_numpy()
    rng = np.random.default_rng(3)
    pos = rng.choice(np.nonzero(truth)[0], 10, replace=False)
    neg = rng.choice(np.nonzero(~truth)[0], 10, replace=False)
    keys = meta[S.KEY].to_numpy()
    concept = fit_concept(
        generated["collection"],
        "random-wm",
        list(keys[pos]),
        list(keys[neg]),
        clip=generated["clip"],
    )
    scores = score_collection(generated["collection"], concept)
    rest = np.setdiff1d(np.arange(len(truth)), np.r_[pos, neg])
    passed = scores[rest] >= concept.threshold
    assert passed.any()
    measured = truth[rest][passed].mean()
    assert abs(concept.quality["estimated_precision"] - measured) <= 0.2


def test_suggestions_come_as_grid_rows(generated):
    truth = (generated["meta"]["shape"] == "star").to_numpy()
    fit = _search_fit(generated, "search-star-rows", "a star", truth, page=40)
    concept, scores = fit["concept"], fit["scores"]
    keys = generated["meta"][S.KEY].to_numpy()
    rows = suggest_rows(concept, keys, scores, n=9)
    assert len(rows) == 9 and all(set(r) == {"key", "id", "score", "why"} for r in rows)
    labelled = set(concept.positives) | set(concept.negatives)
    assert not {r["key"] for r in rows} & labelled
    assert all(
        keys[r["id"]] == r["key"] and r["score"] == pytest.approx(scores[r["id"]]) for r in rows
    )
    assert len({r["id"] for r in rows}) == 9
    # the first third are the best-ranked unlabelled samples, the rest the least certain
    unlabelled = [i for i in np.argsort(-scores, kind="stable") if keys[i] not in labelled]
    assert [r["id"] for r in rows[:3]] == [int(i) for i in unlabelled[:3]]
    assert "ranked #" in rows[0]["why"] and "threshold" in rows[-1]["why"]
    assert suggest_rows(concept, keys, scores, n=4, top=0)[0]["why"].startswith("near")


def test_one_negative_label_still_calibrates_the_threshold_but_grades_nothing(generated):
    meta = generated["meta"]
    truth = (meta["shape"] == "star").to_numpy()
    keys = meta[S.KEY].to_numpy()
    pos, neg = keys[np.nonzero(truth)[0][:8]], keys[np.nonzero(~truth)[0][:1]]
    concept = fit_concept(
        generated["collection"],
        "one-neg",
        list(pos),
        list(neg),
        prompt="a star",
        clip=generated["clip"],
    )
    q = concept.quality
    assert q["grade"] == "unknown" and "1 negative label" in q["reasons"][0]
    scores = score_collection(generated["collection"], concept)
    # the stacker's bare boundary passed 74% of a collection in this case; calibrated, it does not
    assert (scores >= concept.threshold).mean() <= 0.5
    assert 0.0 < q["estimated_precision"] <= 1.0 and "cv_auroc" not in q


def test_a_bad_unlabelled_sample_size_is_one_line(generated):
    keys = generated["meta"][S.KEY].to_numpy()
    with pytest.raises(ValueError, match="unlabelled: a number of samples >= 0, got -1"):
        fit_concept(generated["collection"], "bad", [keys[0]], [keys[1]], unlabelled=-1)
