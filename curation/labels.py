"""A concept's label set as a person gives it, kept in the collection so a reload (or the command
line) loses nothing: `concepts/NAME.labels.json`, {"positives": [keys], "negatives": [keys]}.

The web UI writes it on every 👍/👎 (atomically, so a reader never sees half a file); the
Concepts page reads it back when the page opens, and `python -m curation.concept COLLECTION
NAME --labels` fits from it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from collection import schema as S
from collection.storage import read_json, write_json

log = logging.getLogger(__name__)

KIND = "sieve-labels"
POSITIVE, NEGATIVE = 1, 0


def check_name(name: str) -> None:
    """A concept's name becomes a file name: letters, digits, '-', '_' or '.' only."""
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise ValueError(f"concept name {name!r}: use letters, digits, '-', '_' or '.'")


def load_labels(collection: str, name: str) -> dict[str, int]:
    """{key: 1 (shows the concept) | 0 (does not)} saved for `name`; {} when none is saved.
    A file that is not a label set is refused with its path."""
    check_name(name)
    url = S.InsightLayout(collection).concept_labels(name)
    try:
        doc = read_json(url, missing=None)
    except ValueError as exc:  # json.JSONDecodeError: a damaged file is named, not overwritten
        raise ValueError(f"{url}: not a label set ({exc})") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise ValueError(f"{url}: not a label set (expected kind {KIND!r})")
    pos, neg = doc.get("positives", []), doc.get("negatives", [])
    if not all(isinstance(k, str) for k in [*pos, *neg]):
        raise ValueError(f"{url}: positives and negatives must be lists of sample keys")
    return {**{k: NEGATIVE for k in neg}, **{k: POSITIVE for k in pos}}


def save_labels(collection: str, name: str, labels: dict[str, int]) -> str:
    """Write `labels` ({key: 1 | 0}) as NAME's label set (replacing it); returns the file's URL."""
    check_name(name)
    url = S.InsightLayout(collection).concept_labels(name)
    doc: dict[str, Any] = {
        "kind": KIND,
        "version": 1,
        "name": name,
        "positives": sorted(k for k, v in labels.items() if v == POSITIVE),
        "negatives": sorted(k for k, v in labels.items() if v == NEGATIVE),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(url, doc)
    log.debug("%s: %d + %d labels", url, len(doc["positives"]), len(doc["negatives"]))
    return url
