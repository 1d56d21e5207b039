"""A subset spec's kNN clauses: one query vector from weighted texts, images, keys and
embeddings, then the `k` nearest or every row at `min_similarity` or more, among the rows the
earlier clauses kept (or, with `exclude: true`, those rows removed).

```yaml
knn:
  - text: "a red star:1|blurry:-0.5"      # weighted prompts (models.prompts), negative pushes away
    image: [refs/star.jpg, refs/dark.jpg:-0.3]
    key: "000001234:0.5"                   # a row's own embedding
    embedding: query.npy                   # or a list of numbers
    k: 500                                 # or min_similarity: 0.3
    modality: image                        # the image index (default) or the text index
    exclude: false
```

Similarities are always exact (the collection's float16 embeddings), whatever the index: `k`
gives exactly k rows (all kept rows when fewer), scanning the kept rows exactly when they are
few or when k or the probe it needs is a large share of them, and asking the index for
candidates from a probe widened for the kept share otherwise (`indices.exact`);
`min_similarity` scans few kept rows exactly and is otherwise the index's range search (with a
margin for compressed codes) re-ranked exactly. Ties are broken by id, so resolution is
deterministic.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from typing import Any, Callable

import numpy as np
from PIL import Image

from collection import schema as S
from collection.embeddings import EmbeddingStore
from collection.storage import url_to_fs
from curation.context import Context, ids_array
from curation.spec import SpecError, SpecSource
from indices.exact import EXACT_SHARE, Planner, top, want_for
from indices.rescore import exact_similarities
from models.prompts import PromptError, WeightedPrompt, combine, parse_prompt, parse_prompts

log = logging.getLogger(__name__)

TEXT, IMAGE, KEY, EMBEDDING = "text", "image", "key", "embedding"
ITEMS = (TEXT, IMAGE, KEY, EMBEDDING)
K, MIN_SIMILARITY, MODALITY, EXCLUDE = "k", "min_similarity", "modality", "exclude"
FIELDS = ITEMS + (K, MIN_SIMILARITY, MODALITY, EXCLUDE)

#: up to this many kept rows, `k` scans them exactly rather than asking the index
EXACT_SCAN_MAX = 1 << 18
#: range-search slack for indices whose codes only approximate similarity (PQ, SQ): candidates
#: this far below the threshold are fetched and re-ranked exactly
RANGE_MARGIN = 0.05
#: float32 similarities from faiss and from the re-rank may differ in the last bits
EPS = 1e-6


# ---- parsing -----------------------------------------------------------------------------
def _strings(value: Any, what: str) -> list[str]:
    values = [value] if isinstance(value, str) else value
    if (
        not isinstance(values, list)
        or not values
        or not all(isinstance(v, str) and v.strip() for v in values)
    ):
        raise SpecError(f"{what}: give a string or a list of non-empty strings, got {value!r}")
    return values


def _weighted(value: Any, what: str) -> list[WeightedPrompt]:
    """`item[:weight]` strings (the weighted-prompt syntax, so paths and keys take weights too)."""
    try:
        return [parse_prompt(v) for s in _strings(value, what) for v in s.split("|")]
    except PromptError as exc:
        raise SpecError(f"{what}: {exc}") from None


def _file(path: str, base_dir: str, what: str) -> tuple[str, bytes]:
    """(full path, bytes) of a file a clause names, relative to the spec's folder."""
    full = path if "://" in path or os.path.isabs(path) else os.path.join(base_dir, path)
    fs, fpath = url_to_fs(full)
    try:
        with fs.open(fpath, "rb") as fh:
            return full, fh.read()
    except (OSError, ValueError) as exc:
        raise SpecError(f"{what}: cannot read {full}: {type(exc).__name__}: {exc}") from None


def _embedding_items(value: Any, src: SpecSource, what: str) -> list[dict[str, Any]]:
    if (
        isinstance(value, list)
        and value
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        vec = np.asarray(value, dtype=np.float64)
        if not np.all(np.isfinite(vec)) or not np.any(vec):
            raise SpecError(f"{what}: the embedding must be finite and non-zero")
        return [{"values": [float(v) for v in value], "weight": 1.0}]
    out = []
    for p in _weighted(value, what):
        full, data = _file(p.text, src.base_dir, what)
        out.append(
            {
                "path": p.text,
                "weight": p.weight,
                "sha256": hashlib.sha256(data).hexdigest(),
                "_full": full,
            }
        )
    return out


def parse_clause(clause: Any, i: int, src: SpecSource) -> dict[str, Any]:
    """One kNN clause checked and normalised (defaults filled; files named with their sha256)."""
    what = f"{src.source}: knn[{i}]"
    if not isinstance(clause, dict):
        raise SpecError(
            f"{what}: a kNN clause is a mapping (text:, k:, ...), got {type(clause).__name__}"
        )
    unknown = sorted(set(clause) - set(FIELDS))
    if unknown:
        raise SpecError(f"{what}: unknown field {unknown[0]!r}; known: {', '.join(FIELDS)}")
    out: dict[str, Any] = {name: [] for name in ITEMS}
    if clause.get(TEXT) is not None:
        try:
            prompts = parse_prompts(_strings(clause[TEXT], f"{what}: text"), require_positive=False)
        except PromptError as exc:
            raise SpecError(f"{what}: text: {exc}") from None
        out[TEXT] = [{"text": p.text, "weight": p.weight} for p in prompts]
    if clause.get(IMAGE) is not None:
        for p in _weighted(clause[IMAGE], f"{what}: image"):
            full, data = _file(p.text, src.base_dir, f"{what}: image")
            out[IMAGE].append(
                {
                    "path": p.text,
                    "weight": p.weight,
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "_full": full,
                }
            )
    if clause.get(KEY) is not None:
        out[KEY] = [
            {"key": p.text, "weight": p.weight} for p in _weighted(clause[KEY], f"{what}: key")
        ]
    if clause.get(EMBEDDING) is not None:
        out[EMBEDDING] = _embedding_items(clause[EMBEDDING], src, f"{what}: embedding")
    weights = [item["weight"] for name in ITEMS for item in out[name]]
    if not weights:
        raise SpecError(f"{what}: give at least one of {', '.join(ITEMS)}")
    if not any(w > 0 for w in weights):
        raise SpecError(
            f"{what}: at least one text, image, key or embedding needs a positive weight"
        )
    k, threshold = clause.get(K), clause.get(MIN_SIMILARITY)
    if (k is None) == (threshold is None):
        raise SpecError(f"{what}: give exactly one of k or min_similarity")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise SpecError(f"{what}: k must be a positive integer, got {k!r}")
    if threshold is not None and (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float))
        or not -1.0 <= threshold <= 1.0
    ):
        raise SpecError(f"{what}: min_similarity must be a number in [-1, 1], got {threshold!r}")
    modality = clause.get(MODALITY, S.MODALITY_IMAGE)
    if modality not in S.MODALITIES:
        raise SpecError(
            f"{what}: modality must be one of {', '.join(S.MODALITIES)}, got {modality!r}"
        )
    exclude = clause.get(EXCLUDE, False)
    if not isinstance(exclude, bool):
        raise SpecError(f"{what}: exclude must be true or false, got {exclude!r}")
    out.update(
        {
            K: k,
            MIN_SIMILARITY: None if threshold is None else float(threshold),
            MODALITY: modality,
            EXCLUDE: exclude,
        }
    )
    return out


def parse(value: Any, src: SpecSource) -> list[dict[str, Any]]:
    """The `knn:` field: one clause or a list of them."""
    clauses = [value] if isinstance(value, dict) else value
    if not isinstance(clauses, list) or not clauses:
        raise SpecError(f"{src.source}: knn: give a clause (text:, k:, ...) or a list of them")
    return [parse_clause(c, i, src) for i, c in enumerate(clauses)]


def describe(clause: dict[str, Any], i: int) -> str:
    """One line naming the clause, for dry runs and logs."""
    parts = []
    for name, field in ((TEXT, "text"), (IMAGE, "path"), (KEY, "key"), (EMBEDDING, "path")):
        for item in clause[name]:
            label = item.get(field, f"[{len(item.get('values', []))} numbers]")
            parts.append(f"{name} {str(WeightedPrompt(label, item['weight']))!r}")
    how = f"k={clause[K]}" if clause[K] is not None else f"similarity >= {clause[MIN_SIMILARITY]:g}"
    return (
        f"knn[{i}] {'exclude ' if clause[EXCLUDE] else ''}{', '.join(parts)} "
        f"{how} ({clause[MODALITY]} index)"
    )


# ---- resolving ---------------------------------------------------------------------------
def query_vector(
    ctx: Context, clause: dict[str, Any], dim: int, store: EmbeddingStore, what: str
) -> np.ndarray:
    """The clause's single query: the weighted sum of its items' normalised
    embeddings, renormalised."""
    vectors: list[np.ndarray] = []
    weights: list[WeightedPrompt] = []
    if clause[TEXT]:
        vectors.extend(ctx.clip().encode_texts([t["text"] for t in clause[TEXT]]))
    if clause[IMAGE]:
        images = []
        for item in clause[IMAGE]:
            _, data = _file(item["_full"], ".", what)
            try:
                images.append(Image.open(io.BytesIO(data)).convert("RGB"))
            except (OSError, ValueError, SyntaxError) as exc:
                raise SpecError(f"{what}: {item['path']}: not a readable image ({exc})") from None
        vectors.extend(ctx.clip().encode_images(images))
    if clause[KEY]:
        ids = ctx.ids_of_keys([item["key"] for item in clause[KEY]], what)
        vectors.extend(store.gather(ids))
    for item in clause[EMBEDDING]:
        if "values" in item:
            vec = np.asarray(item["values"], np.float32)
        else:
            _, data = _file(item["_full"], ".", what)
            try:
                vec = np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32).reshape(-1)
            except ValueError as exc:
                raise SpecError(f"{what}: {item['path']}: not a .npy vector ({exc})") from None
        vectors.append(vec)
    for name in ITEMS:
        weights.extend(WeightedPrompt(name, item["weight"]) for item in clause[name])
    bad = [v.shape for v in vectors if v.shape != (dim,)]
    if bad:
        raise SpecError(
            f"{what}: an embedding has shape {bad[0]}, "
            f"the {clause[MODALITY]} index's dimension is {dim}"
        )
    unit = [v / max(float(np.linalg.norm(v)), 1e-12) for v in vectors]
    try:
        return combine(np.stack(unit), weights).astype(np.float32)
    except PromptError as exc:
        raise SpecError(f"{what}: {exc}") from None


def _top(ids: np.ndarray, sims: np.ndarray, k: int) -> np.ndarray:
    """The k best ids by similarity, ties to the lower id."""
    return ids[top(ids, sims, k)]


def _members(ids: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Mask of `cand` entries present in the sorted array `ids`."""
    pos = np.minimum(np.searchsorted(ids, cand), max(len(ids) - 1, 0))
    return (ids[pos] == cand) if len(ids) else np.zeros(len(cand), dtype=bool)


def top_k_within(
    index: Any, doc: dict[str, Any], store: EmbeddingStore, q: np.ndarray, ids: np.ndarray, k: int
) -> np.ndarray:
    """The k rows of `ids` nearest q (all of them when fewer): an exact scan of few rows, or of
    many where k or the probe it needs is a large share (`indices.exact.Planner`), else index
    candidates from a probe widened for the kept share of rows, re-ranked exactly."""
    if len(ids) <= EXACT_SCAN_MAX or k >= EXACT_SHARE * len(ids):
        return _top(ids, exact_similarities(store, ids, q), k)
    planner = Planner(index)
    share = len(ids) / max(index.ntotal, 1)
    want = want_for(k, share, max(4 * k, int(doc.get("params", {}).get("rerank_k", 0)), 64))
    while True:
        probe = planner.probe(q, want)
        if probe is None:  # an exact scan is cheaper than the probe k needs
            return _top(ids, exact_similarities(store, ids, q), k)
        found = planner.search(q, probe)
        cand = np.unique(found)
        cand = cand[_members(ids, cand)]
        if len(cand) >= k or len(found) >= index.ntotal:
            if not probe.exhaustive:
                log.info("knn: approximate: %d rows of %d from a widened probe", k, len(cand))
            return _top(cand, exact_similarities(store, cand, q), k)
        want = want_for(k, max(len(cand), 1) / max(len(found), 1), 2 * probe.depth)


def range_within(
    index: Any,
    doc: dict[str, Any],
    store: EmbeddingStore,
    q: np.ndarray,
    ids: np.ndarray,
    threshold: float,
) -> np.ndarray:
    """Rows of `ids` whose exact similarity to q is at least `threshold`, found by range search."""
    if len(ids) <= EXACT_SCAN_MAX:  # an IVF's range search sees only the lists it probes
        return ids[exact_similarities(store, ids, q) >= threshold]
    key = str(doc.get("index_key", ""))
    margin = RANGE_MARGIN if ("PQ" in key or "SQ" in key) else 0.0
    lims, _, found = index.range_search(q[None, :], threshold - margin - EPS)
    cand = np.unique(found[lims[0] : lims[1]].astype(np.int64))
    cand = cand[_members(ids, cand)]
    sims = exact_similarities(store, cand, q)
    return cand[sims >= threshold]


def step(clause: dict[str, Any], i: int) -> tuple[str, Callable[[Context, np.ndarray], np.ndarray]]:
    """(label, function of the kept ids) for one clause: the resolver's unit of work."""

    def run(ctx: Context, ids: np.ndarray) -> np.ndarray:
        what = f"{ctx.source}: knn[{i}]"
        index, doc, store = ctx.index(clause[MODALITY], what)
        q = query_vector(ctx, clause, store.dim, store, what)
        if clause[K] is not None:
            hits = top_k_within(index, doc, store, q, ids, clause[K])
        else:
            hits = range_within(index, doc, store, q, ids, clause[MIN_SIMILARITY])
        hits = ids_array(hits)
        return np.setdiff1d(ids, hits, assume_unique=True) if clause[EXCLUDE] else hits

    return describe(clause, i), run


def steps(
    clauses: list[dict[str, Any]],
) -> list[tuple[str, Callable[[Context, np.ndarray], np.ndarray]]]:
    return [step(c, i) for i, c in enumerate(clauses)]


def hashable(clauses: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The clauses without their resolved local paths (a spec hashes the same on every machine)."""
    return [
        {
            name: (
                [{k: v for k, v in item.items() if not k.startswith("_")} for item in value]
                if name in ITEMS
                else value
            )
            for name, value in c.items()
        }
        for c in clauses
    ]
