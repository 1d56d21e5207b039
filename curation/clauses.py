"""The clause kinds a subset spec may use, in the order they apply: the one table to extend.

Each kind parses its YAML field into a normalised value (defaults filled, errors naming the
spec and field) and turns it into steps; a step is a labelled function from the ids kept so
far (a sorted array, `curation.context`) to the ids it keeps. The resolver
(`curation.resolve`) runs the kinds present in a spec in this table's order, so a new kind
(duplicates, concepts, map regions) is one more row here and nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from collection import schema as S
from curation import concept_scores as concepts, dedup, filters, knn, map as layout_map
from curation.context import Context, intersect
from curation.spec import SpecError, SpecSource

Step = Callable[[Context, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ClauseKind:
    """A spec field: how to parse it, the steps it makes, its form in the spec hash."""

    name: str
    parse: Callable[[Any, SpecSource], Any]
    steps: Callable[[Any], list[tuple[str, Step]]]
    hashable: Callable[[Any], Any] = lambda value: value


# ---- where: the owner's SQL ----------------------------------------------------------------
def parse_where(value: Any, src: SpecSource) -> list[str]:
    """One SQL boolean expression over `samples`, or a list of them (all must hold)."""
    values = [value] if isinstance(value, str) else value
    if (
        not isinstance(values, list)
        or not values
        or not all(isinstance(v, str) and v.strip() for v in values)
    ):
        raise SpecError(
            f"{src.source}: where: give a SQL condition or a list of them, got {value!r}"
        )
    for v in values:
        if ";" in v:
            raise SpecError(f"{src.source}: where: one SQL condition per entry, no ';' ({v!r})")
    return [v.strip() for v in values]


def where_steps(conditions: list[str]) -> list[tuple[str, Step]]:
    def run(ctx: Context, ids: np.ndarray, sql: str) -> np.ndarray:
        return intersect(ids, ctx.where_ids(sql, "where"))

    return [(f"where {sql}", lambda ctx, ids, sql=sql: run(ctx, ids, sql)) for sql in conditions]


# ---- keys: samples chosen by hand (a grid's selection) -----------------------------------
def parse_keys(value: Any, src: SpecSource) -> list[str]:
    """A list of sample keys, e.g. what a curator selected in a result grid."""
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(k, str) and k.strip() for k in value)
    ):
        raise SpecError(f"{src.source}: keys: give a list of sample keys, got {value!r}")
    return list(dict.fromkeys(k.strip() for k in value))


def keys_steps(keys: list[str]) -> list[tuple[str, Step]]:
    def run(ctx: Context, ids: np.ndarray) -> np.ndarray:
        chosen = np.unique(ctx.ids_of_keys(keys, "keys"))
        return np.intersect1d(ids, chosen, assume_unique=True)

    return [(f"keys ({len(keys)} chosen)", run)]


# ---- filters: a named preset (LAION's recipe) with overrides --------------------------------
PRESET = "preset"


def parse_filters(value: Any, src: SpecSource) -> dict[str, Any]:
    """`filters: laion` or `filters: {preset: laion, max_punsafe: 0.2, ...}` (`curation.filters`'
    field names; the similarity threshold follows the collection's CLIP unless `clip_model` or
    `min_similarity` is given)."""
    if isinstance(value, str):
        value = {PRESET: value}
    if not isinstance(value, dict) or not isinstance(value.get(PRESET, "laion"), str):
        raise SpecError(
            f"{src.source}: filters: give a preset name or a mapping with `preset:` and overrides"
        )
    doc = {PRESET: "laion", **value}
    overrides = {k: v for k, v in doc.items() if k != PRESET}
    try:
        # names and values checked now; the similarity threshold waits for the collection's CLIP
        filters.spec(doc[PRESET], **{"min_similarity": None, **overrides}).clauses()
    except (ValueError, TypeError, KeyError) as exc:
        raise SpecError(
            f"{src.source}: filters: {str(exc).splitlines()[0] if str(exc) else exc!r}"
        ) from None
    return doc


def filters_steps(doc: dict[str, Any]) -> list[tuple[str, Step]]:
    overrides = {k: v for k, v in doc.items() if k != PRESET}
    label = f"filters {doc[PRESET]}" + "".join(f" {k}={v}" for k, v in sorted(overrides.items()))

    def run(ctx: Context, ids: np.ndarray) -> np.ndarray:
        try:
            sql = filters.render(doc[PRESET], **{"clip_model": ctx.clip_model, **overrides})
        except (
            ValueError
        ) as exc:  # e.g. no calibrated similarity threshold for this collection's CLIP
            raise SpecError(f"{ctx.source}: filters: {exc}") from None
        return intersect(ids, ctx.where_ids(sql, "filters"))

    return [(label, run)]


# ---- concept / region / dedup: the insight results (issue 14) ----------------------------
def _mapping(value: Any, field_name: str, src: SpecSource, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SpecError(f"{src.source}: {field_name}: give a mapping, got {value!r}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise SpecError(
            f"{src.source}: {field_name}: "
            f"unknown field{'s' if len(unknown) > 1 else ''} {unknown}; "
            f"expected {sorted(allowed)}"
        )
    return dict(value)


def parse_concept(value: Any, src: SpecSource) -> list[dict[str, Any]]:
    """`concept: {name, min_score}` or a list of them (all must hold); min_score defaults to the
    concept's cross-validated threshold."""
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        doc = _mapping(
            {"name": item} if isinstance(item, str) else item, "concept", src, {"name", "min_score"}
        )
        if not isinstance(doc.get("name"), str) or not doc["name"]:
            raise SpecError(
                f"{src.source}: concept: `name` (a concept saved under concepts/) is required"
            )
        score = doc.get("min_score")
        if score is not None and (
            isinstance(score, bool) or not isinstance(score, (int, float)) or not 0 <= score <= 1
        ):
            raise SpecError(
                f"{src.source}: concept: min_score must be a number in [0, 1], got {score!r}"
            )
        out.append({"name": doc["name"], "min_score": None if score is None else float(score)})
    return out


def concept_steps(items: list[dict[str, Any]]) -> list[tuple[str, Step]]:
    def run(ctx: Context, ids: np.ndarray, name: str, score: float | None) -> np.ndarray:
        try:
            return concepts.subset_clause(ctx.collection, ids, name, score, ctx.scorer)
        except (ValueError, FileNotFoundError) as exc:
            raise SpecError(f"{ctx.source}: concept {name}: {str(exc).splitlines()[0]}") from None

    return [
        (
            f"concept {it['name']} score >= "
            f"{'its threshold' if it['min_score'] is None else it['min_score']}",
            lambda ctx, ids, it=it: run(ctx, ids, it["name"], it["min_score"]),
        )
        for it in items
    ]


def parse_region(value: Any, src: SpecSource) -> dict[str, Any]:
    """`region: {modality: image, rect: [x0, y0, x1, y1]}` or
    `{polygon: [[x, y], ...]}` on the map."""
    doc = _mapping(value, "region", src, {"modality", "rect", "polygon"})
    modality = doc.get("modality", S.MODALITY_IMAGE)
    if modality not in (S.MODALITY_IMAGE, S.MODALITY_TEXT):
        raise SpecError(f"{src.source}: region: modality must be image or text, got {modality!r}")
    rect, polygon = doc.get("rect"), doc.get("polygon")
    if (rect is None) == (polygon is None):
        raise SpecError(
            f"{src.source}: region: give exactly one of rect: "
            "[x0, y0, x1, y1] or polygon: [[x, y], ...]"
        )
    try:
        if rect is not None:
            rect = [float(v) for v in rect]
            if len(rect) != 4:
                raise ValueError
        else:
            polygon = [[float(x), float(y)] for x, y in polygon]
            if len(polygon) < 3:
                raise ValueError
    except (TypeError, ValueError):
        raise SpecError(
            f"{src.source}: region: rect needs 4 numbers, polygon at least 3 [x, y] points"
        ) from None
    return {"modality": modality, "rect": rect, "polygon": polygon}


def region_steps(doc: dict[str, Any]) -> list[tuple[str, Step]]:
    shape = (
        f"rect {doc['rect']}"
        if doc["rect"] is not None
        else f"polygon of {len(doc['polygon'])} points"
    )

    def run(ctx: Context, ids: np.ndarray) -> np.ndarray:
        try:
            return layout_map.region_clause(
                ctx.collection, ids, doc["modality"], doc["rect"], doc["polygon"]
            )
        except (ValueError, FileNotFoundError) as exc:
            raise SpecError(f"{ctx.source}: region: {str(exc).splitlines()[0]}") from None

    return [(f"region of the {doc['modality']} map: {shape}", run)]


def parse_dedup(value: Any, src: SpecSource) -> dict[str, Any]:
    """`dedup: copies` or `dedup: {level: exact|copies|semantic, eps: 0.05}` (one member per
    group of that level's run); several levels: `level: exact,copies` or a list."""
    doc = _mapping(
        {"level": value} if isinstance(value, str) else value, "dedup", src, {"level", "eps"}
    )
    level, eps = doc.get("level", S.LEVEL_COPIES), doc.get("eps", 0.05)
    try:
        levels = S.dedup_levels(level if isinstance(level, (str, list)) else str(level))
    except ValueError as exc:
        raise SpecError(f"{src.source}: dedup: {exc}") from None
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise SpecError(f"{src.source}: dedup: eps must be a number in (0, 1), got {eps!r}")
    return {"level": ",".join(levels), "eps": float(eps)}


def dedup_steps(doc: dict[str, Any]) -> list[tuple[str, Step]]:
    def run(ctx: Context, ids: np.ndarray) -> np.ndarray:
        try:
            return dedup.subset_clause(ctx.collection, ids, doc["level"], doc["eps"])
        except (ValueError, FileNotFoundError) as exc:
            raise SpecError(f"{ctx.source}: dedup: {str(exc).splitlines()[0]}") from None

    eps = f" eps {doc['eps']:g}" if S.LEVEL_SEMANTIC in S.dedup_levels(doc["level"]) else ""
    return [(f"dedup {doc['level']}{eps} (one sample per duplicate group)", run)]


# ---- limit: a seeded sample ---------------------------------------------------------------
def parse_limit(value: Any, src: SpecSource) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpecError(f"{src.source}: limit: must be a positive integer, got {value!r}")
    return value


def limit_steps(n: int) -> list[tuple[str, Step]]:
    def run(ctx: Context, ids: np.ndarray) -> np.ndarray:
        if len(ids) <= n:
            return ids
        pick = np.random.default_rng(ctx.seed).choice(len(ids), size=n, replace=False)
        return ids[np.sort(pick)]

    return [(f"limit {n} (a random sample, seed from the spec)", run)]


#: the clause kinds, in the order they apply
CLAUSES: list[ClauseKind] = [
    ClauseKind("where", parse_where, where_steps),
    ClauseKind("keys", parse_keys, keys_steps, sorted),
    ClauseKind("filters", parse_filters, filters_steps),
    ClauseKind("concept", parse_concept, concept_steps),
    ClauseKind("region", parse_region, region_steps),
    ClauseKind("dedup", parse_dedup, dedup_steps),
    ClauseKind("knn", knn.parse, knn.steps, knn.hashable),
    ClauseKind("limit", parse_limit, limit_steps),
]
