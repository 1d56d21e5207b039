"""Concepts by example: fit, threshold and quality, save/load round-trip, scoring, suggestions,
the subset clause, the command, and each bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from collection import schema as S
from collection.parts import read_metadata
from curation.concept_probe import (
    Concept,
    fit_concept,
    load_concept,
    score_collection,
    score_vectors,
    suggest,
)
from curation.concept_scores import save_concept, subset_clause
from curation.dedup import dedup, subset_clause as dedup_clause
from curation.map import compute_map, region_clause
from curation.resolve import resolve
from curation.spec import SpecError
from curation.vectors import read_keys


@pytest.fixture(scope="module")
def labelled(insight_collection) -> dict:
    coll = insight_collection["collection"]
    meta = read_metadata(coll, [S.KEY, "watermark", "shape"])
    keys = np.asarray(meta.column(S.KEY).to_pylist(), dtype=object)
    truth = np.asarray(meta.column("watermark").to_pylist(), dtype=bool)
    rng = np.random.default_rng(0)
    pos = list(keys[rng.choice(np.nonzero(truth)[0], 6, replace=False)])
    neg = list(keys[rng.choice(np.nonzero(~truth)[0], 6, replace=False)])
    return {"collection": coll, "keys": keys, "truth": truth, "pos": pos, "neg": neg}


@pytest.fixture(scope="module")
def watermark_concept(labelled, tiny_clip) -> Concept:
    return fit_concept(
        labelled["collection"],
        "watermarked",
        labelled["pos"],
        labelled["neg"],
        prompt="a picture with a watermark",
        clip=tiny_clip,
    )


def test_a_concept_learns_from_a_dozen_labels(labelled, watermark_concept):
    scores = score_collection(labelled["collection"], watermark_concept)
    rest = ~np.isin(labelled["keys"], labelled["pos"] + labelled["neg"])
    assert roc_auc_score(labelled["truth"][rest], scores[rest]) > 0.8
    assert 0.0 < watermark_concept.threshold < 1.0
    q = watermark_concept.quality
    assert (
        q["grade"] in ("excellent", "good", "fair", "poor")
        and q["n_positive"] == q["n_negative"] == 6
    )
    assert 0.0 <= q["cv_auroc"] <= 1.0 and q["cv_folds"] >= 2


def test_save_load_round_trip_and_the_saved_scores(labelled, watermark_concept):
    coll = labelled["collection"]
    scores = score_collection(coll, watermark_concept)
    path = save_concept(coll, watermark_concept, scores)
    assert path == S.InsightLayout(coll).concept("watermarked")
    back = load_concept(coll, "watermarked")
    assert back == watermark_concept
    assert np.array_equal(score_collection(coll, back), scores)
    doc = json.loads(open(path).read())
    assert doc["positives"] == labelled["pos"] and doc["prompt"] == "a picture with a watermark"
    import pyarrow.parquet as pq

    table = pq.read_table(S.InsightLayout(coll).concept_scores("watermarked"))
    assert table.column(S.KEY).to_pylist() == list(read_keys(coll))
    assert np.allclose(table.column(S.CONCEPT_SCORE).to_numpy(), scores)


def test_subset_clause_keeps_ids_at_or_above_the_score(labelled, watermark_concept):
    coll = labelled["collection"]
    save_concept(coll, watermark_concept)
    scores = score_collection(coll, watermark_concept)
    ids = np.arange(0, len(scores), 2)
    assert (
        subset_clause(coll, ids, "watermarked").tolist()
        == ids[scores[ids] >= watermark_concept.threshold].tolist()
    )
    assert subset_clause(coll, ids, "watermarked", min_score=0.0).tolist() == ids.tolist()
    with pytest.raises(ValueError, match="min_score must be in"):
        subset_clause(coll, ids, "watermarked", min_score=1.5)
    with pytest.raises(FileNotFoundError, match="no concept 'nothing'.*curation.concept"):
        subset_clause(coll, ids, "nothing")


def test_suggestions_are_unlabelled_and_closest_to_the_threshold(labelled, watermark_concept):
    scores = score_collection(labelled["collection"], watermark_concept)
    picked = suggest(watermark_concept, labelled["keys"], scores, n=5)
    assert len(picked) == 5 and not set(picked) & set(labelled["pos"] + labelled["neg"])
    t = watermark_concept.threshold
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    margin = np.abs(logit(np.clip(scores, 1e-9, 1 - 1e-9)) - logit(t))
    index = {k: i for i, k in enumerate(labelled["keys"])}
    worst_picked = max(margin[index[k]] for k in picked)
    unpicked = [
        i
        for i, k in enumerate(labelled["keys"])
        if k not in picked and k not in labelled["pos"] + labelled["neg"]
    ]
    assert worst_picked <= margin[unpicked].min() + 1e-6


def test_scoring_is_one_linear_pass_over_float16_parts():
    rng = np.random.default_rng(0)
    img = [rng.standard_normal((n, 16)).astype(np.float16) for n in (5, 0, 9)]
    txt = [rng.standard_normal((n, 16)).astype(np.float16) for n in (5, 0, 9)]
    c = Concept(
        "c",
        [],
        [],
        image_weights=list(rng.standard_normal(16)),
        text_weights=list(rng.standard_normal(16)),
        columns={S.PWATERMARK: {"mean": 0.5, "std": 0.25, "weight": 2.0}},
        bias=-0.3,
    )
    col = rng.random(14)
    col[3] = np.nan  # a missing value counts as the labelled mean
    got = score_vectors(c, img, txt, {S.PWATERMARK: col}, threads=2)
    x_i, x_t = np.concatenate(img).astype(np.float64), np.concatenate(txt).astype(np.float64)
    logit = (
        -0.3
        + x_i @ c.image_weights
        + x_t @ c.text_weights
        + 2.0 * (np.nan_to_num(col, nan=0.5) - 0.5) / 0.25
    )
    assert np.allclose(got, 1 / (1 + np.exp(-logit)), atol=2e-3)


def test_the_command_fits_saves_and_suggests(labelled):
    coll = labelled["collection"]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "curation.concept",
            coll,
            "wm-cli",
            "--pos",
            ",".join(labelled["pos"][:3]),
            "--neg",
            ",".join(labelled["neg"][:3]),
            "--suggest",
            "4",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert len(out["label_next"]) == 4 and out["samples"] == len(labelled["keys"])
    more = subprocess.run(
        [
            sys.executable,
            "-m",
            "curation.concept",
            coll,
            "wm-cli",
            "--add",
            "--pos",
            labelled["pos"][3],
            "--neg",
            labelled["neg"][3],
        ],
        capture_output=True,
        text=True,
    )
    assert more.returncode == 0, more.stderr[-2000:]
    assert load_concept(coll, "wm-cli").positives == labelled["pos"][:4]


@pytest.mark.parametrize(
    "pos,neg,message",
    [
        (["nope-1"], ["nope-2"], "unknown keys nope-1, nope-2"),
        (["A", "B"], [], "no negative example"),
        ([], ["A", "B"], "no positive example"),
        (["A"], [], "at least 2 labelled samples"),
        (["A"], ["A"], "labelled both positive and negative"),
    ],
)
def test_bad_examples_get_one_line_errors(labelled, pos, neg, message):
    real = {"A": labelled["pos"][0], "B": labelled["pos"][1]}
    pos, neg = [real.get(k, k) for k in pos], [real.get(k, k) for k in neg]
    with pytest.raises(ValueError, match=message):
        fit_concept(labelled["collection"], "bad", pos, neg)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "curation.concept",
            labelled["collection"],
            "bad",
            "--pos",
            ",".join(pos),
            "--neg",
            ",".join(neg),
        ],
        capture_output=True,
        text=True,
    )
    assert (
        done.returncode == 2
        and message.split()[0] in done.stderr
        and "Traceback" not in done.stderr
    )


def test_a_collection_without_embeddings_is_refused(tmp_path, labelled):
    with pytest.raises(Exception, match="no such collection|_done"):
        fit_concept(str(tmp_path / "empty"), "x", ["a"], ["b"])
    with pytest.raises(ValueError, match="concept name"):
        fit_concept(labelled["collection"], "../escape", labelled["pos"], labelled["neg"])


def test_subset_specs_use_concept_region_and_dedup_clauses(labelled, watermark_concept):
    """The resolver runs the insight clauses in the clause table's order,
    each on what the previous kept."""
    coll = labelled["collection"]
    save_concept(coll, watermark_concept)
    compute_map(coll, sample=200, clusters=4)
    dedup(coll, S.LEVEL_EXACT, workers=0)
    rect = [-1e9, -1e9, 1e9, 1e9]
    res = resolve(
        coll, {"concept": {"name": "watermarked"}, "region": {"rect": rect}, "dedup": "exact"}
    )
    scores = score_collection(coll, watermark_concept)
    base = np.nonzero(scores >= watermark_concept.threshold)[0]
    expected = dedup_clause(coll, region_clause(coll, base, rect=rect), S.LEVEL_EXACT)
    assert res.ids.tolist() == expected.tolist() and 0 < len(res) < len(scores)
    assert [s.label.split()[0] for s in res.steps[1:]] == ["concept", "region", "dedup"]
    tight = resolve(coll, {"concept": [{"name": "watermarked", "min_score": 0.99}]})
    assert set(tight.ids) <= set(res.ids) | set(base)
    for spec, message in [
        ({"concept": {"name": "nothing"}}, "no concept 'nothing'"),
        (
            {"concept": {"name": "watermarked", "min_score": 2}},
            r"min_score must be a number in \[0, 1\]",
        ),
        ({"region": {"rect": [0, 1]}}, "rect needs 4 numbers"),
        ({"region": {"rect": rect, "polygon": [[0, 0], [1, 0], [1, 1]]}}, "exactly one of"),
        ({"dedup": {"level": "fuzzy"}}, "level must be one of"),
        ({"dedup": {"level": "semantic", "eps": 1.5}}, r"eps must be a number in \(0, 1\)"),
    ]:
        with pytest.raises(SpecError, match=message):
            resolve(coll, spec)
