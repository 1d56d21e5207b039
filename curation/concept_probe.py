"""Concepts by example: a few samples labelled yes / no (and optionally a text prompt) become a
linear probe that scores every sample of the collection, saved as `concepts/{name}.json`.

The probe is stacked, because twenty labels cannot fit a few hundred weights at once:
- block probes: a balanced logistic regression on the CLIP image embeddings, another on the
  caption (text) embeddings, and per block the positives' mean direction (a centroid);
- fixed features: the prompt's CLIP similarity to the image and to the caption (the prior),
  and the collection's own per-sample scores (pwatermark, punsafe, ptoxic, clip_similarity)
  where the labelled samples have them;
- a second balanced logistic regression weighs those few signals, trained on the block
  probes' out-of-fold outputs (a block that only memorised the labels earns no weight), with
  the prompt's similarities starting from a prior weight the labels adjust, and a random
  sample of unlabelled samples giving the scale, the base rate and the threshold
  (`curation.concept_fit`: people label a search's first page, which alone says nothing about
  the rest of the collection).

Everything is linear in the embeddings and columns, so the saved model is one weight vector
per modality plus column weights: scoring is one streaming pass over the memory-mapped
float16 embeddings (`score_vectors`). The quality (grade, reasons, cross-validated AUROC beside
the prompt's own, estimated precision and share of what passes the threshold) comes with the
concept. `suggest_rows` returns the samples to label next as rows for a grid. Saving a concept
with its scores, and reading them back for a subset clause, is `curation.concept_scores`.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pyarrow as pa

from collection import schema as S
from collection.embeddings import read_block
from collection.parts import CollectionError, read_metadata
from collection.storage import read_collection_json, read_json, url_to_fs
from curation.catalog import TABLE, Catalog
from curation.concept_fit import Signals, fit_stack, grade_fit, linear_scores, modality_of
from curation.labels import check_name as _check_name
from curation.vectors import open_store
from models.runtime import cores

if TYPE_CHECKING:  # annotations only: torch loads when a concept is scored
    import torch

log = logging.getLogger(__name__)

MODALITIES = ("image", "text", "both")
#: per-sample scores a probe may use when the labelled samples have them
SCORE_COLUMNS: tuple[str, ...] = (S.PWATERMARK, S.PUNSAFE, S.PTOXIC, S.CLIP_SIMILARITY)
#: unlabelled samples a fit reads (scale, prompt prior, base rate, threshold)
UNLABELLED_SAMPLE = 4096
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


def _features(
    collection: str,
    ids: np.ndarray,
    modality: str,
    prompt_vec: np.ndarray | None,
    values: dict[str, np.ndarray],
) -> Signals:
    """Some samples' embedding blocks, prompt similarities and score columns (`values`: each
    column's values of `ids`, missing ones NaN)."""
    blocks: dict[str, np.ndarray] = {}
    fixed: dict[str, np.ndarray] = {}
    for m in ("image", "text") if modality == "both" else (modality,):
        x = open_store(collection, m).read_rows(ids).astype(np.float64)
        blocks[m] = x
        if prompt_vec is not None:
            fixed[f"prompt_{m}"] = x @ prompt_vec
    for col, v in values.items():
        fixed[f"column:{col}"] = v
    return Signals(blocks, fixed)


def label_ids(catalog: Catalog, keys: Sequence[str], what: str) -> np.ndarray:
    """Global ids of embedded `keys`, in order, by a join in DuckDB (the collection's keys never
    come into Python); an unknown key is a ValueError naming it (and `what` they are)."""
    want = pa.table({"k": pa.array(list(keys), pa.string()), "pos": np.arange(len(keys))})
    got = catalog.joined(
        want,
        f"SELECT w.pos AS pos, min(s.{S.ID}) AS i FROM _want w LEFT JOIN {TABLE} s "
        f"ON s.{S.KEY} = w.k AND s.{S.ID} IS NOT NULL GROUP BY w.pos ORDER BY w.pos",
    )
    found = got.column("i")
    missing = [k for k, ok in zip(keys, found.is_valid().to_pylist()) if not ok]
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (
            f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        )
        raise ValueError(f"{what}: unknown key{'s' if len(missing) > 1 else ''} {shown}")
    return found.to_numpy(zero_copy_only=False).astype(np.int64)


def column_values(
    catalog: Catalog, ids: np.ndarray, columns: Sequence[str]
) -> dict[str, np.ndarray]:
    """The float values (NaN where missing) of `columns` the collection has, for `ids` in order:
    one join in DuckDB, so a fit reads its few rows' scores, not every row's."""
    present = [c for c in columns if c in catalog.columns]
    if not present:
        return {}
    want = pa.table({"i": pa.array(ids, pa.int64()), "pos": np.arange(len(ids))})
    cols = ", ".join(f"s.{c}::DOUBLE AS {c}" for c in present)
    got = catalog.joined(
        want,
        f"SELECT w.pos, {cols} FROM _want w LEFT JOIN {TABLE} s ON s.{S.ID} = w.i ORDER BY w.pos",
    )
    return {c: got.column(c).to_numpy(zero_copy_only=False).astype(float) for c in present}


def _usable_columns(lab: Signals, unl: Signals) -> tuple[Signals, Signals]:
    """Drop score columns the labelled samples lack or do not vary on; fill the unlabelled
    samples' missing values with their mean."""
    fixed_l, fixed_u = {}, {}
    for f, v in lab.fixed.items():
        if f.startswith("column:") and (not np.all(np.isfinite(v)) or v.std() <= 1e-9):
            continue
        u = unl.fixed[f]
        finite = np.isfinite(u)
        fill = float(u[finite].mean()) if finite.any() else float(v.mean())
        fixed_l[f], fixed_u[f] = v, np.where(finite, u, fill)
    return Signals(lab.blocks, fixed_l), Signals(unl.blocks, fixed_u)


def _unlabelled_ids(n: int, labelled: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A random sample of the ids not labelled, sorted (memory-mapped reads in file order). Drawn
    among `size` + labels ids (Floyd's method: no array of the collection's size), so its cost
    does not grow with the collection."""
    labelled = np.unique(np.asarray(labelled, dtype=np.int64))
    if n - len(labelled) <= size:
        return np.setdiff1d(np.arange(n), labelled)
    drawn = np.random.default_rng(seed).choice(n, size + len(labelled), replace=False)
    return np.sort(drawn[~np.isin(drawn, labelled)][:size])


def _to_concept_weights(
    model: dict[str, Any], dim: int, prompt_vec: np.ndarray | None
) -> dict[str, Any]:
    """Fold the stacked model into one weight vector per modality, column weights and a bias."""
    bias = model["bias"]
    weights = {m: np.zeros(dim) for m in ("image", "text")}
    used = set()
    for p, (w, c) in model["blocks"].items():
        s, mu, sd = model[p]
        weights[modality_of(p)] += s / sd * w
        bias += s * (c - mu) / sd
        used.add(modality_of(p))
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
    if clip is None:
        from models.clip import load_clip  # torch and open_clip: only without a given encoder

        clip = load_clip(read_collection_json(collection).get("clip_model", "sieve-tiny"))
    vec = np.asarray(clip.encode_texts([prompt])[0], dtype=np.float64)
    return vec / max(float(np.linalg.norm(vec)), 1e-12)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


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
    unlabelled: int = UNLABELLED_SAMPLE,
) -> Concept:
    """Fit a concept from labelled keys, the prompt as a prior and a random sample of
    `unlabelled` other samples (scale, base rate, threshold); see `curation.concept_fit`."""
    _check_name(name)
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {list(MODALITIES)}, got {modality!r}")
    if unlabelled < 0:
        raise ValueError(f"unlabelled: a number of samples >= 0, got {unlabelled}")
    positives, negatives = list(dict.fromkeys(positives)), list(dict.fromkeys(negatives))
    check_examples(positives, negatives)
    # the labelled keys and the sampled rows' scores by joins in DuckDB, the embeddings of
    # those rows alone: nothing read or held grows with the collection but the scan
    with Catalog(collection) as catalog:
        ids = label_ids(catalog, positives + negatives, "concept examples")
        y = np.array([1] * len(positives) + [0] * len(negatives))
        prompt_vec = _prompt_vector(collection, prompt, clip)
        others = _unlabelled_ids(catalog.parts.ok_rows, ids, unlabelled, seed)
        # one join (one scan of the score columns) for the labelled and the sampled rows
        values = column_values(catalog, np.concatenate([ids, others]), columns)
    lab_values = {c: v[: len(ids)] for c, v in values.items()}
    unl_values = {c: v[len(ids) :] for c, v in values.items()}
    lab, unl = _usable_columns(
        _features(collection, ids, modality, prompt_vec, lab_values),
        _features(collection, others, modality, prompt_vec, unl_values),
    )
    model, signals = fit_stack(lab, y, unl, seed)
    dim = next(iter(lab.blocks.values())).shape[1]
    linear = _to_concept_weights(model, dim, prompt_vec)
    threshold, quality = grade_fit(lab, y, unl, linear_scores(model, unl), seed)
    info = read_collection_json(collection)
    concept = Concept(
        name=name,
        positives=positives,
        negatives=negatives,
        prompt=prompt,
        modality=modality,
        clip_model=info.get("clip_model", "sieve-tiny"),
        threshold=float(_sigmoid(np.array(threshold))),
        quality=quality,
        signals=signals,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **linear,
    )
    log.info(
        "concept %s: %s (cv AUROC %s, passes %s, precision ~%s) from %d+/%d- labels",
        name,
        quality.get("grade"),
        quality.get("cv_auroc"),
        quality.get("passed_fraction"),
        quality.get("estimated_precision"),
        len(positives),
        len(negatives),
    )
    return concept


def _half_dot(chunk: np.ndarray, w: torch.Tensor) -> np.ndarray:
    """float16 rows (memory-mapped, read-only) times a float16 weight vector, accumulated by torch's
    CPU half-precision kernel: several times cheaper than converting the rows to float32 in numpy
    first (`python -m bench.insight`, concept scoring)."""
    import torch  # loaded by the first concept scored: the web UI's pages open without it

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
    import torch  # loaded by the first concept scored: the web UI's pages open without it

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
            logit[out : out + hi - lo] += _half_dot(read_block(image[p], lo, hi), w_img)
        if w_txt is not None:
            logit[out : out + hi - lo] += _half_dot(read_block(text[p], lo, hi), w_txt)

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


def suggest_rows(
    concept: Concept,
    keys: Sequence[str] | np.ndarray,
    scores: np.ndarray,
    n: int = 10,
    top: int | None = None,
) -> list[dict[str, Any]]:
    """The n unlabelled samples worth labelling next, as grid rows {"key", "id", "score", "why"}.

    `keys` and `scores` are in global-id order (`read_keys`, `score_collection`), so "id" is the
    row. First `top` (default n // 3) of the highest-ranked ones: a wrong one there is what the
    threshold passes first (the pink squares of a "red circle"); then those closest to the
    threshold, where the concept is least sure."""
    labelled = set(concept.positives) | set(concept.negatives)
    t = min(max(concept.threshold, 1e-6), 1 - 1e-6)
    logit = np.log(np.maximum(scores, 1e-9) / np.maximum(1 - scores, 1e-9))
    margin = np.abs(logit - math.log(t / (1 - t)))
    top = n // 3 if top is None else max(0, min(int(top), n))
    rows: list[dict[str, Any]] = []
    seen: set[int] = set()

    def take(order: np.ndarray, limit: int, why: Any) -> None:
        for rank, i in enumerate(order):
            if len(rows) >= limit:
                return
            key = keys[i]
            key = key.as_py() if isinstance(key, pa.Scalar) else str(key)
            if int(i) not in seen and key not in labelled:
                seen.add(int(i))
                score = float(scores[i])
                rows.append({"key": key, "id": int(i), "score": score, "why": why(rank)})

    take(
        np.argsort(-scores, kind="stable"),
        top,
        lambda rank: f"ranked #{rank + 1}: confirm it belongs (it passes first)",
    )
    take(
        np.argsort(margin, kind="stable"),
        n,
        lambda rank: f"near the threshold {t:.3f}: the concept is least sure",
    )
    return rows


def ranking(
    collection: str,
    concept: Concept,
    scores: np.ndarray,
    top: int = 20,
    near: int = 10,
) -> dict[str, Any]:
    """What a page shows of the collection scored by `concept`, without the per-row scores:
    rows, rows at or above the threshold, the `top` ids by score (ties by id, as a stable sort
    gives them) and the `near` unlabelled ids closest to the threshold (`suggest`'s order),
    each list as [(id, score)]. Partial sorts: the cost is one pass over `scores`."""
    n = len(scores)
    k = min(max(int(top), 0), n)
    head = np.argpartition(-scores, k - 1)[:k] if 0 < k < n else np.arange(n)[:k]
    head = head[np.lexsort((head, -scores[head]))]
    with Catalog(collection) as catalog:
        labelled = label_ids(catalog, concept.positives + concept.negatives, "concept examples")
    t = min(max(concept.threshold, 1e-6), 1 - 1e-6)
    logit = np.log(np.maximum(scores, 1e-9) / np.maximum(1 - scores, 1e-9))
    margin = np.abs(logit - math.log(t / (1 - t)))
    m = min(max(int(near), 0) + len(labelled), n)
    close = np.argpartition(margin, m - 1)[:m] if 0 < m < n else np.arange(n)[:m]
    close = close[np.lexsort((close, margin[close]))]
    close = close[~np.isin(close, labelled)][: max(int(near), 0)]
    return {
        "rows": n,
        "above": int(np.count_nonzero(scores >= concept.threshold)),
        "top": [(int(i), float(scores[i])) for i in head],
        "near": [(int(i), float(scores[i])) for i in close],
    }


def suggest(concept: Concept, keys: np.ndarray, scores: np.ndarray, n: int = 10) -> list[str]:
    """The keys of the n unlabelled samples the probe is least sure of (score closest to its
    threshold); `suggest_rows` gives rows for a grid, the top of the ranking included."""
    return [r["key"] for r in suggest_rows(concept, keys, scores, n, top=0)]


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
    return sorted(
        n[:-5]
        for n in names
        if n.endswith(".json")
        and not n.startswith(".")
        and not n.endswith(S.CONCEPT_LABELS_SUFFIX)  # a label set, not a fitted concept
    )
