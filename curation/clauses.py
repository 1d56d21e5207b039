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

from curation import filters, knn
from curation.context import Context
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
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise SpecError(f"{src.source}: where: give a SQL condition or a list of them, got {value!r}")
    for v in values:
        if ";" in v:
            raise SpecError(f"{src.source}: where: one SQL condition per entry, no ';' ({v!r})")
    return [v.strip() for v in values]


def where_steps(conditions: list[str]) -> list[tuple[str, Step]]:
    def run(ctx: Context, ids: np.ndarray, sql: str) -> np.ndarray:
        return np.intersect1d(ids, ctx.where_ids(sql, "where"), assume_unique=True)

    return [(f"where {sql}", lambda ctx, ids, sql=sql: run(ctx, ids, sql)) for sql in conditions]


# ---- filters: a named preset (LAION's recipe) with overrides --------------------------------
PRESET = "preset"


def parse_filters(value: Any, src: SpecSource) -> dict[str, Any]:
    """`filters: laion` or `filters: {preset: laion, max_punsafe: 0.2, ...}` (`curation.filters`'
    field names; the similarity threshold follows the collection's CLIP unless `clip_model` or
    `min_similarity` is given)."""
    if isinstance(value, str):
        value = {PRESET: value}
    if not isinstance(value, dict) or not isinstance(value.get(PRESET, "laion"), str):
        raise SpecError(f"{src.source}: filters: give a preset name or a mapping with `preset:` and overrides")
    doc = {PRESET: "laion", **value}
    overrides = {k: v for k, v in doc.items() if k != PRESET}
    try:
        # names and values checked now; the similarity threshold waits for the collection's CLIP
        filters.spec(doc[PRESET], **{"min_similarity": None, **overrides}).clauses()
    except (ValueError, TypeError, KeyError) as exc:
        raise SpecError(f"{src.source}: filters: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    return doc


def filters_steps(doc: dict[str, Any]) -> list[tuple[str, Step]]:
    overrides = {k: v for k, v in doc.items() if k != PRESET}
    label = f"filters {doc[PRESET]}" + "".join(f" {k}={v}" for k, v in sorted(overrides.items()))

    def run(ctx: Context, ids: np.ndarray) -> np.ndarray:
        try:
            sql = filters.render(doc[PRESET], **{"clip_model": ctx.clip_model, **overrides})
        except ValueError as exc:  # e.g. no calibrated similarity threshold for this collection's CLIP
            raise SpecError(f"{ctx.source}: filters: {exc}") from None
        return np.intersect1d(ids, ctx.where_ids(sql, "filters"), assume_unique=True)

    return [(label, run)]


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
    ClauseKind("filters", parse_filters, filters_steps),
    ClauseKind("knn", knn.parse, knn.steps, knn.hashable),
    ClauseKind("limit", parse_limit, limit_steps),
]
