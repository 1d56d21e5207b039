"""Resolve a subset spec on a collection: the rows it names, in a deterministic order, and the
hash that identifies the query.

Every embedded row the takedown list allows is the start; each clause kind of
`curation.clauses` present in the spec then narrows the set, in that table's order. The
result is in ascending global id (the collection's own order, which also keeps an export's
reads of one source shard together), so the same spec on the same collection gives the same
keys in the same order. `spec_hash` covers the normalised spec (defaults filled, files by
content) and the collection's id, not its name or description.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from curation.clauses import CLAUSES
from curation.context import Context
from curation.spec import (
    DESCRIPTION,
    META_FIELDS,
    NAME,
    SEED,
    SpecError,
    SpecSource,
    check_meta,
    collection_id,
    read_spec,
    stable_hash,
)

if TYPE_CHECKING:  # annotations only: resolving loads no model unless a clause needs one
    from models.clip import Clip

log = logging.getLogger(__name__)


@dataclass
class ParsedSpec:
    """A checked spec: its name, description and seed, and each present clause kind's value."""

    meta: dict[str, Any]
    clauses: dict[str, Any]
    source: SpecSource

    def normalised(self) -> dict[str, Any]:
        """The spec with defaults filled (absent clauses as null), as recorded in manifests."""
        doc = dict(self.meta)
        for kind in CLAUSES:
            doc[kind.name] = (
                kind.hashable(self.clauses[kind.name]) if kind.name in self.clauses else None
            )
        return doc


def parse_spec(spec: str | dict[str, Any], collection: str) -> ParsedSpec:
    """Read and check a spec (file path, subset name in the collection, or mapping)."""
    src = read_spec(spec, collection)
    known = [*META_FIELDS, *(k.name for k in CLAUSES)]
    unknown = sorted(str(k) for k in set(src.doc) - set(known))
    if unknown:
        raise SpecError(
            f"{src.source}: unknown field {unknown[0]!r}; a spec has {', '.join(known)}"
        )
    clauses = {
        kind.name: kind.parse(src.doc[kind.name], src)
        for kind in CLAUSES
        if src.doc.get(kind.name) is not None
    }
    return ParsedSpec(check_meta(src), clauses, src)


def spec_hash(parsed: ParsedSpec, collection: str) -> str:
    """Identifies the query: the normalised spec (less name and description) and the
    collection's id."""
    spec = {k: v for k, v in parsed.normalised().items() if k not in (NAME, DESCRIPTION)}
    return stable_hash({"spec": spec, "collection": collection_id(collection)})


@dataclass
class Step:
    """One clause's effect: its label, the rows left after it, a few of their captions."""

    label: str
    count: int
    captions: list[str] = field(default_factory=list)


@dataclass
class Resolution:
    """The rows a spec names on a collection, in order, and how it got there."""

    name: str
    spec: dict[str, Any]
    spec_hash: str
    collection: str
    collection_id: str
    ids: np.ndarray
    keys: list[str]
    steps: list[Step]
    blocked: int = 0

    def __len__(self) -> int:
        return len(self.ids)


def resolve(
    collection: str,
    spec: str | dict[str, Any] | ParsedSpec,
    untrusted: bool = False,
    examples: int = 0,
    encoder: Clip | None = None,
    on_step: Callable[[Step], None] | None = None,
) -> Resolution:
    """The rows `spec` names on `collection`; SpecError (one line, naming spec and field) if
    it cannot.

    `untrusted` runs the spec's own SQL sandboxed (`Catalog(untrusted=True)`), for specs that
    came from the web UI. `examples` captions are kept per step (dry runs); `on_step` sees each
    step as it finishes. `encoder` reuses a loaded CLIP model for text and image clauses.
    """
    parsed = spec if isinstance(spec, ParsedSpec) else parse_spec(spec, collection)
    ctx = Context(  # first: a missing or unreachable collection is a SpecError naming it
        collection,
        parsed.source.source,
        parsed.source.base_dir,
        parsed.meta[SEED],
        untrusted,
        encoder,
    )
    cid = collection_id(collection)
    steps: list[Step] = []

    def record(label: str, ids: np.ndarray) -> None:
        done = Step(label, int(len(ids)), ctx.captions(ids, examples) if examples else [])
        steps.append(done)
        log.info("%s: %d rows", label, done.count)
        if on_step is not None:
            on_step(done)

    try:
        ids = ctx.base_ids()
        record(f"embedded rows ({ctx.blocked} taken down)", ids)
        for kind in CLAUSES:
            if kind.name in parsed.clauses:
                for label, run in kind.steps(parsed.clauses[kind.name]):
                    ids = run(ctx, ids)
                    record(label, ids)
        keys = ctx.keys(ids)
    finally:
        ctx.close()
    return Resolution(
        parsed.meta[NAME],
        parsed.normalised(),
        spec_hash(parsed, collection),
        collection,
        cid,
        ids,
        keys,
        steps,
        ctx.blocked,
    )
