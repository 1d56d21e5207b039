"""Subset specs on disk: `subsets/NAME.yaml` found, read and checked for shape; stable hashes.

A spec is a YAML mapping: `name`, `description`, `seed`, and clauses (`where`, `filters`,
`knn`, `limit`, and the kinds later issues register in `curation.clauses`). This module knows
only the file: which keys are clauses and what they mean is the clause table's business.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import dataclass
from typing import Any

import yaml

from collection import schema as S
from collection.storage import read_collection_json, url_to_fs

#: top-level fields that describe a spec rather than select rows
NAME, DESCRIPTION, SEED = "name", "description", "seed"
META_FIELDS = (NAME, DESCRIPTION, SEED)
DEFAULT_SEED = 0


class SpecError(ValueError):
    """A spec that cannot be used; the one-line message names the spec file and the field."""


@dataclass(frozen=True)
class SpecSource:
    """A spec's YAML mapping, where it came from (for messages) and where
    its relative paths start."""

    doc: dict[str, Any]
    source: str
    base_dir: str


def find_spec(spec: str, collection: str) -> str:
    """The YAML file a SPEC argument names: a path, else `COLLECTION/subsets/SPEC.yaml`."""
    if os.path.isfile(spec):
        return spec
    named = S.CollectionLayout(collection).subset(spec)
    fs, path = url_to_fs(named)
    if "/" not in spec and not spec.endswith((".yaml", ".yml")) and fs.exists(path):
        return named
    raise SpecError(
        f"{spec}: no such spec file, and no subset named {spec!r} "
        f"in {S.CollectionLayout(collection).subsets_dir}"
    )


def read_spec(spec: str | dict[str, Any], collection: str) -> SpecSource:
    """Read a spec from a file path, a subset name in the collection,
    or a mapping (the Python API)."""
    if isinstance(spec, dict):
        return SpecSource(dict(spec), "<spec>", os.getcwd())
    path = find_spec(spec, collection)
    fs, fpath = url_to_fs(path)
    try:
        with fs.open(fpath, "rb") as fh:
            doc = yaml.safe_load(fh.read().decode("utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{path}: malformed YAML{where}: {problem}") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not UTF-8 text ({exc.reason})") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise SpecError(
            f"{path}: a spec is a YAML mapping (name:, where:, knn:, ...), "
            f"not a {type(doc).__name__}"
        )
    base = posixpath.dirname(path) if "://" in path else os.path.dirname(os.path.abspath(path))
    return SpecSource(doc, path, base)


def check_meta(src: SpecSource) -> dict[str, Any]:
    """name, description and seed, checked, with defaults filled
    (name defaults to the file's stem)."""
    doc = src.doc
    stem = os.path.splitext(os.path.basename(src.source))[0] if src.source != "<spec>" else "subset"
    name = doc.get(NAME, stem)
    if not isinstance(name, str) or not name.strip():
        raise SpecError(f"{src.source}: name: must be a non-empty string, got {name!r}")
    description = doc.get(DESCRIPTION) or ""
    if not isinstance(description, str):
        raise SpecError(
            f"{src.source}: description: must be text, got {type(description).__name__}"
        )
    seed = doc.get(SEED, DEFAULT_SEED)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SpecError(f"{src.source}: seed: must be a non-negative integer, got {seed!r}")
    return {NAME: name.strip(), DESCRIPTION: description, SEED: seed}


def stable_hash(obj: Any, n: int = 16) -> str:
    """A hex digest of `obj` as canonical JSON (sorted keys, no spaces):
    equal values, equal hashes."""
    text = json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def collection_id(collection: str) -> str:
    """What identifies a collection's contents: collection.json's creation
    time, CLIP model and counts.

    A collection re-embedded from scratch gets a new `created`; one that grew by parts gets new
    counts: either way a spec resolved on it is a different query.
    """
    info = read_collection_json(collection)
    if not info:
        raise SpecError(
            f"{collection}: no {S.COLLECTION_JSON}; "
            "is this a collection (python -m pipelines.embed)?"
        )
    return stable_hash(
        {k: info.get(k) for k in ("created", "clip_model", "emb_dim", "parts", "count", "ok")}
    )
