"""Resolve a subset spec on a collection: the rows it names, in a deterministic order, and the
hash that identifies the query.

Every embedded row the takedown list allows is the start; each clause kind of
`curation.clauses` present in the spec then narrows the set, in that table's order. The
result is in ascending global id (the collection's own order, which also keeps an export's
reads of one source shard together), so the same spec on the same collection gives the same
keys in the same order. `spec_hash` covers the normalised spec (defaults filled, files by
content) and the collection's id, not its name or description.

Resolving is incremental when given a `StepCache`: the rows after every step are kept (as a
bitmap or an id list, whichever is smaller) under a hash of the steps so far, so a spec that
only adds a clause after the ones already resolved starts from the longest resolved prefix and
runs the new steps on its rows alone, with the same result as a full resolve.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
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
    from curation.catalog import Catalog
    from curation.concept_scores import Scorer
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


class StepCache:
    """The rows kept after each resolved prefix of steps, least recently used first out, in at
    most `max_bytes` (a 10M-row collection's bitmap is 1.25 MB). Thread-safe; one per process
    serves every session, keyed by the caller's `version` of the collection's files."""

    def __init__(self, max_bytes: int = 64 * 2**20) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[np.ndarray, int, str, int, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0

    def peek(self, key: str) -> Step | None:
        """The step stored under `key` (its label and count), without its rows."""
        with self._lock:
            entry = self._entries.get(key)
        return None if entry is None else Step(entry[2], entry[3])

    def get(self, key: str) -> tuple[np.ndarray, Step, int] | None:
        """(ids, the step that made them, rows taken down) stored under `key`, or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            self.hits += 1
        packed, n, label, count, blocked = entry
        if packed.dtype == np.uint8:
            ids = np.flatnonzero(np.unpackbits(packed, count=n)).astype(np.int64)
        else:
            ids = packed.astype(np.int64)
        return ids, Step(label, count), blocked

    def put(self, key: str, ids: np.ndarray, step: Step, blocked: int) -> None:
        """Keep the rows `ids` (sorted unique ids) after `step`."""
        n = int(ids[-1]) + 1 if len(ids) else 0
        if len(ids) * 4 <= (n + 7) // 8 or n >= 2**31:
            packed = ids.astype(np.int32 if n < 2**31 else np.int64)
        else:
            mask = np.zeros(n, dtype=bool)
            mask[ids] = True
            packed = np.packbits(mask)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[0].nbytes
            self._entries[key] = (packed, n, step.label, step.count, blocked)
            self._bytes += packed.nbytes
            while self._bytes > self.max_bytes and len(self._entries) > 1:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= dropped[0].nbytes


def _step_keys(parsed: ParsedSpec, collection: str, untrusted: bool, version: Any) -> list[str]:
    """The cache key of every step's result: a hash of everything that decides it (the
    collection and its files' version, the seed, the sandbox, every step up to it)."""
    head = {
        "collection": collection,
        "id": collection_id(collection),
        "version": repr(version),
        "seed": parsed.meta[SEED],
        "untrusted": untrusted,
        "base_dir": parsed.source.base_dir,
    }
    keys = [stable_hash({"head": head, "steps": []})]
    done: list[Any] = []
    for kind in CLAUSES:
        if kind.name not in parsed.clauses:
            continue
        value = parsed.clauses[kind.name]
        n = len(kind.steps(value))
        for i in range(n):
            # a list kind's step i is decided by its first i + 1 entries
            entry = value[: i + 1] if isinstance(value, list) and len(value) == n else value
            done.append([kind.name, i, kind.hashable(entry)])
            keys.append(stable_hash({"head": head, "steps": done}))
    return keys


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
    cache: StepCache | None = None,
    version: Any = None,
    keys: bool = True,
    sandbox: Catalog | None = None,
    scorer: Scorer | None = None,
) -> Resolution:
    """The rows `spec` names on `collection`; SpecError (one line, naming spec and field) if
    it cannot.

    `untrusted` runs the spec's own SQL sandboxed (`Catalog(untrusted=True)`), for specs that
    came from the web UI. `examples` captions are kept per step (dry runs); `on_step` sees each
    step as it finishes. `encoder` reuses a loaded CLIP model for text and image clauses.
    `cache` resumes from the longest prefix of steps it holds (see `StepCache`; `version`
    must change whenever the collection's takedown list, concepts, map or duplicates do);
    `keys=False` leaves `Resolution.keys` empty (a dry run needs only the counts). `sandbox`
    (untrusted only: `curation.context.sandbox_catalog`, kept by the caller) runs the spec's SQL
    on workers already started, instead of starting and stopping some per resolution.
    `scorer` scores a concept clause's rows when the concept's saved scores are not current
    (`curation.concept_scores`; the web UI's encoder process), instead of this process.
    """
    parsed = spec if isinstance(spec, ParsedSpec) else parse_spec(spec, collection)
    ctx = Context(  # first: a missing or unreachable collection is a SpecError naming it
        collection,
        parsed.source.source,
        parsed.source.base_dir,
        parsed.meta[SEED],
        untrusted,
        encoder,
        sandbox if untrusted else None,
        scorer,
    )
    cid = collection_id(collection)
    steps: list[Step] = []

    def record(label: str, ids: np.ndarray) -> None:
        done = Step(label, int(len(ids)), ctx.captions(ids, examples) if examples else [])
        steps.append(done)
        log.info("%s: %d rows", label, done.count)
        if on_step is not None:
            on_step(done)

    runs = [
        (label, run)
        for kind in CLAUSES
        if kind.name in parsed.clauses
        for label, run in kind.steps(parsed.clauses[kind.name])
    ]
    step_keys = _step_keys(parsed, collection, untrusted, version) if cache is not None else []
    start, ids, blocked = 0, None, 0
    if cache is not None and not examples:  # captions are not cached: a full run gives them
        known = []  # the longest prefix of steps the cache holds
        for key in step_keys:
            step = cache.peek(key)
            if step is None:
                break
            known.append(step)
        hit = cache.get(step_keys[len(known) - 1]) if known else None
        if hit is not None:
            ids, _, blocked = hit
            steps[:] = known
            start = len(known)
    try:
        if ids is None:
            ids = ctx.base_ids()
            blocked = ctx.blocked
            record(f"embedded rows ({blocked} taken down)", ids)
            if cache is not None:
                cache.put(step_keys[0], ids, steps[-1], blocked)
            start = 1
        else:
            log.info("resumed after %d of %d steps: %d rows", start - 1, len(runs), len(ids))
        for i in range(start - 1, len(runs)):
            label, run = runs[i]
            ids = run(ctx, ids)
            record(label, ids)
            if cache is not None:
                cache.put(step_keys[i + 1], ids, steps[-1], blocked)
        found = ctx.keys(ids) if keys else []
    finally:
        ctx.close()
    return Resolution(
        parsed.meta[NAME],
        parsed.normalised(),
        spec_hash(parsed, collection),
        collection,
        cid,
        ids,
        found,
        steps,
        blocked,
    )
