"""Concepts by example: a few samples labelled yes / no (and optionally a text prompt) become a
linear probe that scores every sample of the collection, saved as `concepts/{name}.json`.

The probe is stacked, because twenty labels cannot fit a few hundred weights at once:
- block probes: a balanced logistic regression on the CLIP image embeddings, another on the
  caption (text) embeddings;
- fixed features: the prompt's CLIP similarity to the image and to the caption (the prior),
  and the collection's own per-sample scores (pwatermark, punsafe, ptoxic, clip_similarity)
  where the labelled samples have them;
- a second balanced logistic regression weighs those few signals, trained on the block
  probes' out-of-fold outputs, so a block that only memorised the labels earns no weight.

Everything is linear in the embeddings and columns, so the saved model is one weight vector
per modality plus column weights: scoring is one streaming pass over the memory-mapped
float16 embeddings (`score_vectors`). The threshold is the one with the best F1 on
cross-validated predictions of the labelled samples, and the same predictions give the
quality grade (AUROC). `suggest` returns the unlabelled samples the probe is least sure of.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch
from scipy.optimize import minimize
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

from collection import schema as S
from collection.parts import CollectionError, read_metadata
from collection.storage import read_collection_json, read_json, url_to_fs, write_json
from curation.vectors import ids_of, open_store, read_keys, write_table
from models.clip import load_clip
from models.runtime import cores

log = logging.getLogger(__name__)

MODALITIES = ("image", "text", "both")
#: per-sample scores a probe may use when the labelled samples have them
SCORE_COLUMNS: tuple[str, ...] = (S.PWATERMARK, S.PUNSAFE, S.PTOXIC, S.CLIP_SIMILARITY)
#: regularisation (sklearn's C) of the block probes and of the stacker
BLOCK_C = 1.0
STACK_C = 1.0
#: labelled AUROC a prompt similarity or score column needs to enter the probe
MIN_SIGNAL_AUROC = 0.75
#: cross-validation folds at most (fewer when a class has fewer labels)
MAX_FOLDS = 5
#: quality grades by cross-validated AUROC, best first
GRADES: tuple[tuple[float, str], ...] = (
    (0.95, "excellent"),
    (0.85, "good"),
    (0.7, "fair"),
    (0.0, "poor"),
)
#: rows per chunk of the scoring pass
SCORE_CHUNK = 1 << 18


@dataclass
class Concept:
    """A fitted concept: its examples, its linear model over the collection's features,
    threshold, quality."""

    name: str
    positives: list[str]
    negatives: list[str]
    prompt: str | None = None
    modality: str = "both"
    clip_model: str = "sieve-tiny"
    image_weights: list[float] | None = None
    text_weights: list[float] | None = None
    #: column -> {"mean", "std", "weight"}: weight applies to (value - mean) / std; missing
    #: values count as the mean
    columns: dict[str, dict[str, float]] = field(default_factory=dict)
    bias: float = 0.0
    threshold: float = 0.5
    quality: dict[str, Any] = field(default_factory=dict)
    signals: dict[str, float] = field(default_factory=dict)
    created: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"kind": "sieve-concept", "version": 1, **asdict(self)}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "Concept":
        fields = {k: v for k, v in doc.items() if k in cls.__dataclass_fields__}
        return cls(**fields)


def _check_name(name: str) -> None:
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise ValueError(f"concept name {name!r}: use letters, digits, '-', '_' or '.'")


def check_examples(positives: Sequence[str], negatives: Sequence[str]) -> None:
    """Enough labels of both kinds, no key labelled both ways (ValueError naming the problem)."""
    if len(positives) + len(negatives) < 2:
        raise ValueError(
            f"a concept needs at least 2 labelled samples, got {len(positives) + len(negatives)}"
        )
    if not positives or not negatives:
        kind = "positive" if not positives else "negative"
        raise ValueError(f"a concept needs positive and negative examples; no {kind} example given")
    both = sorted(set(positives) & set(negatives))
    if both:
        raise ValueError(f"keys labelled both positive and negative: {', '.join(both[:5])}")


def _block_probe(x: np.ndarray, y: np.ndarray, c: float = BLOCK_C) -> tuple[np.ndarray, float]:
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=2000)
    model.fit(x, y)
    return model.coef_[0].astype(np.float64), float(model.intercept_[0])


def _stack(
    x: np.ndarray,
    y: np.ndarray,
    bounds: list[tuple[float | None, float | None]],
    c: float = STACK_C,
) -> tuple[np.ndarray, float]:
    """Class-balanced, L2-regularised logistic regression with bounds on the weights (not the
    bias)."""
    w_class = np.where(
        y == 1, len(y) / (2.0 * max(y.sum(), 1)), len(y) / (2.0 * max(len(y) - y.sum(), 1))
    )
    sign = 2.0 * y - 1.0

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:-1], theta[-1]
        z = sign * (x @ w + b)
        value = float((w_class * np.logaddexp(0.0, -z)).sum() + 0.5 / c * (w @ w))
        g = -w_class * sign * (1.0 - 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60))))  # d loss / d logit
        return value, np.concatenate([x.T @ g + w / c, [g.sum()]])

    theta0 = np.zeros(x.shape[1] + 1)
    result = minimize(
        loss, theta0, jac=True, method="L-BFGS-B", bounds=list(bounds) + [(None, None)]
    )
    return result.x[:-1], float(result.x[-1])


def _folds(y: np.ndarray, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    k = min(MAX_FOLDS, int(min(y.sum(), len(y) - y.sum())))
    if k < 2:
        return []
    return list(
        StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)
    )


@dataclass
class _Features:
    """The labelled samples' features: embedding blocks, fixed signals (prompt similarities,
    columns)."""

    blocks: dict[str, np.ndarray]
    fixed: dict[str, np.ndarray]


def _evident(values: np.ndarray, y: np.ndarray, either_sign: bool) -> bool:
    """Whether a fixed signal separates the labelled samples well enough to be weighed at all."""
    auc = float(roc_auc_score(y, values))
    return max(auc, 1.0 - auc) >= MIN_SIGNAL_AUROC if either_sign else auc >= MIN_SIGNAL_AUROC


def _fit_linear(
    feats: _Features, y: np.ndarray, seed: int
) -> tuple[dict[str, Any], dict[str, float]]:
    """Stacked probe on labelled features -> linear model {block: (w, b), signal: (weight,
    mean, std)}."""
    # a fixed signal (prompt similarity, score column) that does not separate the labels is left
    # out: with twenty labels the stacker would otherwise fit its chance correlations
    feats = _Features(
        feats.blocks,
        {
            f: v
            for f, v in feats.fixed.items()
            if _evident(v, y, either_sign=f.startswith("column:"))
        },
    )
    names = list(feats.blocks) + list(feats.fixed)
    oof = {b: np.zeros(len(y)) for b in feats.blocks}
    folds = _folds(y, seed)
    for b, x in feats.blocks.items():
        if folds:
            for train, test in folds:
                w, c = _block_probe(x[train], y[train])
                oof[b][test] = x[test] @ w + c
        else:  # too few labels to hold any out: the block's own fit stands in
            w, c = _block_probe(x, y)
            oof[b] = x @ w + c
    stack = np.stack([oof[b] for b in feats.blocks] + [feats.fixed[f] for f in feats.fixed], axis=1)
    mean, std = stack.mean(axis=0), stack.std(axis=0)
    std = np.where(std > 1e-9, std, 1.0)
    # a probe's held-out output and the prompt's similarity can only speak for the concept:
    # their weights are kept non-negative (a negative weight would be fitting noise)
    signs = [(0.0, None) if not n.startswith("column:") else (None, None) for n in names]
    s, bias = _stack((stack - mean) / std, y, signs)
    model: dict[str, Any] = {"bias": bias}
    for k, name in enumerate(names):
        model[name] = (float(s[k]), float(mean[k]), float(std[k]))
    model["blocks"] = {b: _block_probe(x, y) for b, x in feats.blocks.items()}
    return model, {name: float(s[k]) for k, name in enumerate(names)}


def _labelled_features(
    collection: str,
    ids: np.ndarray,
    modality: str,
    prompt_vec: np.ndarray | None,
    columns: Sequence[str],
    meta: pa.Table,
) -> tuple[_Features, dict[str, np.ndarray]]:
    """Features of the labelled ids and the raw prompt-similarity inputs (for folding into
    weights)."""
    blocks: dict[str, np.ndarray] = {}
    fixed: dict[str, np.ndarray] = {}
    for m in ("image", "text") if modality == "both" else (modality,):
        x = open_store(collection, m).gather(ids).astype(np.float64)
        blocks[m] = x
        if prompt_vec is not None:
            fixed[f"prompt_{m}"] = x @ prompt_vec
    for col in columns:
        if col in meta.column_names:
            values = np.asarray(meta.column(col).take(pa.array(ids)).to_pylist(), dtype=float)
            if np.all(np.isfinite(values)) and values.std() > 1e-9:
                fixed[f"column:{col}"] = values
    return _Features(blocks, fixed), blocks


def _to_concept_weights(
    model: dict[str, Any], dim: int, prompt_vec: np.ndarray | None
) -> dict[str, Any]:
    """Fold the stacked model into one weight vector per modality, column weights and a bias."""
    bias = model["bias"]
    weights = {m: np.zeros(dim) for m in ("image", "text")}
    used = set()
    for b, (w, c) in model["blocks"].items():
        s, mu, sd = model[b]
        weights[b] += s / sd * w
        bias += s * (c - mu) / sd
        used.add(b)
    for m in ("image", "text"):
        if f"prompt_{m}" in model and prompt_vec is not None:
            s, mu, sd = model[f"prompt_{m}"]
            weights[m] += s / sd * prompt_vec
            bias -= s * mu / sd
            used.add(m)
    columns = {}
    for name in [k for k in model if k.startswith("column:")]:
        s, mu, sd = model[name]
        columns[name.split(":", 1)[1]] = {"mean": mu, "std": sd, "weight": s}
    return {
        "image_weights": weights["image"].tolist() if "image" in used else None,
        "text_weights": weights["text"].tolist() if "text" in used else None,
        "columns": columns,
        "bias": float(bias),
    }


def _prompt_vector(collection: str, prompt: str | None, clip: Any) -> np.ndarray | None:
    if not prompt:
        return None
    clip = clip or load_clip(read_collection_json(collection).get("clip_model", "sieve-tiny"))
    vec = np.asarray(clip.encode_texts([prompt])[0], dtype=np.float64)
    return vec / max(float(np.linalg.norm(vec)), 1e-12)


def _linear_scores(model: dict[str, Any], feats: _Features) -> np.ndarray:
    """Logits of the stacked model on labelled-style features (used for held-out folds)."""
    logit = np.full(len(next(iter(feats.blocks.values()))), model["bias"])
    for b, x in feats.blocks.items():
        w, c = model["blocks"][b]
        s, mu, sd = model[b]
        logit += s * ((x @ w + c) - mu) / sd
    for f, v in feats.fixed.items():
        if f not in model:  # left out for want of evidence
            continue
        s, mu, sd = model[f]
        logit += s * (v - mu) / sd
    return logit


def _subset(feats: _Features, rows: np.ndarray) -> _Features:
    return _Features(
        {k: v[rows] for k, v in feats.blocks.items()}, {k: v[rows] for k, v in feats.fixed.items()}
    )


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


def _quality(feats: _Features, y: np.ndarray, seed: int) -> tuple[float, dict[str, Any]]:
    """Threshold (best F1 on cross-validated probabilities) and the quality they show."""
    folds = _folds(y, seed + 1)
    if not folds:
        return 0.5, {
            "grade": "unknown",
            "reason": "fewer than 2 labels of a kind: nothing to hold out",
            "n_positive": int(y.sum()),
            "n_negative": int(len(y) - y.sum()),
        }
    prob = np.zeros(len(y))
    for train, test in folds:
        model, _ = _fit_linear(_subset(feats, train), y[train], seed)
        prob[test] = _sigmoid(_linear_scores(model, _subset(feats, test)))
    auroc = float(roc_auc_score(y, prob))
    best_f1, threshold = -1.0, 0.5
    cuts = np.unique(prob)
    for lo, hi in zip(np.concatenate([[0.0], cuts]), np.concatenate([cuts, [1.0]])):
        t = (lo + hi) / 2  # midway between neighbouring predictions
        pred = prob >= t
        tp = float((pred & (y == 1)).sum())
        f1 = 2 * tp / max(float(pred.sum() + y.sum()), 1e-9)
        if f1 > best_f1:
            best_f1, threshold = f1, float(t)
    grade = next(g for limit, g in GRADES if auroc >= limit)
    return threshold, {
        "grade": grade,
        "cv_auroc": round(auroc, 4),
        "cv_f1": round(best_f1, 4),
        "cv_folds": len(folds),
        "n_positive": int(y.sum()),
        "n_negative": int(len(y) - y.sum()),
    }


def fit_concept(
    collection: str,
    name: str,
    positives: Sequence[str],
    negatives: Sequence[str],
    prompt: str | None = None,
    modality: str = "both",
    columns: Sequence[str] = SCORE_COLUMNS,
    clip: Any = None,
    seed: int = 0,
) -> Concept:
    """Fit a concept from labelled keys (and a prompt as prior); see the module doc for the
    model."""
    _check_name(name)
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {list(MODALITIES)}, got {modality!r}")
    positives, negatives = list(dict.fromkeys(positives)), list(dict.fromkeys(negatives))
    check_examples(positives, negatives)
    ids = ids_of(read_keys(collection), positives + negatives, "concept examples")
    y = np.array([1] * len(positives) + [0] * len(negatives))
    meta = read_metadata(collection, [S.KEY, *columns])
    prompt_vec = _prompt_vector(collection, prompt, clip)
    feats, blocks = _labelled_features(collection, ids, modality, prompt_vec, columns, meta)
    model, signals = _fit_linear(feats, y, seed)
    dim = next(iter(blocks.values())).shape[1]
    linear = _to_concept_weights(model, dim, prompt_vec)
    threshold, quality = _quality(feats, y, seed)
    info = read_collection_json(collection)
    concept = Concept(
        name=name,
        positives=positives,
        negatives=negatives,
        prompt=prompt,
        modality=modality,
        clip_model=info.get("clip_model", "sieve-tiny"),
        threshold=threshold,
        quality=quality,
        signals={k: round(v, 4) for k, v in signals.items()},
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **linear,
    )
    log.info(
        "concept %s: %s (cv AUROC %s) from %d+/%d- labels",
        name,
        quality.get("grade"),
        quality.get("cv_auroc"),
        len(positives),
        len(negatives),
    )
    return concept


def _half_dot(chunk: np.ndarray, w: torch.Tensor) -> np.ndarray:
    """float16 rows (memory-mapped, read-only) times a float16 weight vector, accumulated by torch's
    CPU half-precision kernel: several times cheaper than converting the rows to float32 in numpy
    first (`python -m bench.insight`, concept scoring)."""
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", UserWarning
        )  # read-only mmap: torch is never asked to write to it
        rows = torch.from_numpy(np.ascontiguousarray(chunk))
    if rows.dtype != torch.float16:
        return (rows.float() @ w.float()).numpy()
    return (rows @ w).float().numpy()


def score_vectors(
    concept: Concept,
    image: Sequence[np.ndarray] = (),
    text: Sequence[np.ndarray] = (),
    columns: dict[str, np.ndarray] | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """Probabilities for parts of (memory-mapped float16) embeddings: one pass in chunks, on
    parallel threads (torch releases the GIL in its kernels)."""
    w_img = (
        None
        if concept.image_weights is None
        else torch.tensor(concept.image_weights, dtype=torch.float16)
    )
    w_txt = (
        None
        if concept.text_weights is None
        else torch.tensor(concept.text_weights, dtype=torch.float16)
    )
    if w_img is not None and not image:
        raise CollectionError(f"concept {concept.name}: needs image embeddings")
    if w_txt is not None and not text:
        raise CollectionError(f"concept {concept.name}: needs text embeddings")
    lengths = [len(a) for a in (image or text)]
    total = int(sum(lengths))
    logit = np.full(total, concept.bias, np.float32)
    jobs = []
    offset = 0
    for p, n in enumerate(lengths):
        for lo in range(0, n, SCORE_CHUNK):
            jobs.append((p, lo, min(n, lo + SCORE_CHUNK), offset + lo))
        offset += n

    def run(job: tuple[int, int, int, int]) -> None:
        p, lo, hi, out = job
        if w_img is not None:
            logit[out : out + hi - lo] += _half_dot(image[p][lo:hi], w_img)
        if w_txt is not None:
            logit[out : out + hi - lo] += _half_dot(text[p][lo:hi], w_txt)

    with ThreadPoolExecutor(threads or cores()) as pool:
        list(pool.map(run, jobs))
    for col, spec in concept.columns.items():
        values = None if columns is None else columns.get(col)
        if values is None:
            raise CollectionError(f"concept {concept.name}: needs the {col!r} column")
        v = np.asarray(values, dtype=np.float32)
        v = np.where(np.isfinite(v), v, spec["mean"])
        logit += spec["weight"] * (v - spec["mean"]) / spec["std"]
    return _sigmoid(logit).astype(np.float32)


def score_collection(collection: str, concept: Concept) -> np.ndarray:
    """Every embedded sample's probability of the concept, in global-id order."""
    stores = {}
    for modality, weights in (
        (S.MODALITY_IMAGE, concept.image_weights),
        (S.MODALITY_TEXT, concept.text_weights),
    ):
        if weights is not None:
            stores[modality] = open_store(collection, modality)
            if stores[modality].dim != len(weights):
                raise CollectionError(
                    f"concept {concept.name}: fit on {len(weights)}-dim {modality} embeddings "
                    f"({concept.clip_model}), but {collection} has {stores[modality].dim}-dim ones"
                )
    image = stores[S.MODALITY_IMAGE].arrays if S.MODALITY_IMAGE in stores else ()
    text = stores[S.MODALITY_TEXT].arrays if S.MODALITY_TEXT in stores else ()
    columns = None
    if concept.columns:
        meta = read_metadata(collection, list(concept.columns))
        columns = {  # straight from Arrow (nulls as NaN): no Python object per row
            c: meta.column(c).cast(pa.float64()).to_numpy()
            for c in concept.columns
            if c in meta.column_names
        }
    return score_vectors(
        concept, [a for a in image if len(a)], [a for a in text if len(a)], columns
    )


def suggest(concept: Concept, keys: np.ndarray, scores: np.ndarray, n: int = 10) -> list[str]:
    """The n unlabelled samples the probe is least sure of (score closest to its threshold)."""
    labelled = set(concept.positives) | set(concept.negatives)
    t = min(max(concept.threshold, 1e-6), 1 - 1e-6)
    margin = np.abs(
        np.log(np.maximum(scores, 1e-9) / np.maximum(1 - scores, 1e-9)) - math.log(t / (1 - t))
    )
    out = []
    for i in np.argsort(margin, kind="stable"):
        if keys[i] not in labelled:
            out.append(str(keys[i]))
            if len(out) == n:
                break
    return out


def save_concept(
    collection: str,
    concept: Concept,
    scores: np.ndarray | None = None,
    keys: np.ndarray | None = None,
) -> str:
    """Write concepts/{name}.json (and, given scores, concepts/{name}.parquet: key, score);
    return the json path."""
    layout = S.InsightLayout(collection)
    path = layout.concept(concept.name)
    if scores is not None:  # first: the json is what lists a concept as saved
        # the key column as Arrow reads it: no Python object per row
        keys = read_metadata(collection, [S.KEY]).column(S.KEY) if keys is None else keys
        write_table(
            layout.concept_scores(concept.name),
            pa.table(
                {
                    S.KEY: keys
                    if isinstance(keys, pa.ChunkedArray)
                    else pa.array(keys, pa.string()),
                    S.CONCEPT_SCORE: pa.array(scores, pa.float32()),
                }
            ),
        )
    write_json(path, concept.to_json())
    return path


def load_concept(collection: str, name: str) -> Concept:
    """A saved concept (FileNotFoundError naming the command that makes one)."""
    _check_name(name)
    doc = read_json(S.InsightLayout(collection).concept(name))
    if doc is None:
        raise FileNotFoundError(
            f"{collection}: no concept {name!r}; make it with "
            f"`python -m curation.concept {collection} {name} --pos KEYS --neg KEYS`"
        )
    return Concept.from_json(doc)


def saved_concepts(collection: str) -> list[str]:
    """Names of the concepts saved in the collection (concepts/NAME.json), sorted."""
    fs, folder = url_to_fs(S.InsightLayout(collection).concepts_dir)
    if not fs.isdir(folder):
        return []
    names = (p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False))
    return sorted(n[:-5] for n in names if n.endswith(".json") and not n.startswith("."))


def subset_clause(
    collection: str, ids: Sequence[int] | np.ndarray, name: str, min_score: float | None = None
) -> np.ndarray:
    """A subset spec's `concept: {name, min_score}` clause: the ids whose score is at least
    min_score (default: the concept's cross-validated threshold)."""
    concept = load_concept(collection, name)
    limit = concept.threshold if min_score is None else float(min_score)
    if not 0.0 <= limit <= 1.0:
        raise ValueError(f"concept clause: min_score must be in [0, 1], got {min_score!r}")
    ids = np.asarray(ids, dtype=np.int64)
    scores = score_collection(collection, concept)
    return ids[scores[ids] >= limit]
