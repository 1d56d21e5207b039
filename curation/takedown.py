"""The takedown command:
`python -m curation.takedown COLLECTION add|remove|list \
    [--key K | --url U | --sha256 H | --file FILE]`.

The list itself (its file, matching, atomic rewrites) is `collection.takedown`, which search,
the server, SQL and export enforce.

`--file FILE`: a .parquet or .csv with any of the columns key / url / sha256 (and optionally
reason), or a text file with one entry per line: a line with `://` is a url, 64 hex digits a
sha256, anything else a key (blank lines and lines starting with `#` are skipped).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from typing import Any, Sequence

from collection import schema as S
from collection.takedown import (
    TakedownError,
    add_entries,
    check_collection,
    list_entries,
    make_entries,
    read_entry_file,
    remove,
)
from models.runtime import setup_logging


def takedown(
    collection: str,
    action: str,
    keys: Sequence[str] = (),
    urls: Sequence[str] = (),
    sha256: Sequence[str] = (),
    file: str | None = None,
    reason: str = "",
) -> dict[str, Any]:
    """The command: add / remove / list entries; returns a summary (list: the entries as rows)."""
    if action == "list":
        check_collection(collection)
        rows = list_entries(collection).to_pylist()
        return {
            "entries": len(rows),
            "rows": [
                {k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in r.items()}
                for r in rows
            ],
        }
    if action not in ("add", "remove"):
        raise TakedownError(f"unknown action {action!r}; expected add, remove or list")
    entries = make_entries(keys, urls, sha256, reason or None) + (
        read_entry_file(file, reason or None) if file else []
    )
    if not entries:
        raise TakedownError(
            f"{action}: give at least one --key, --url, --sha256 or a --file with entries"
        )
    if action == "add":
        return {
            "added": add_entries(collection, entries),
            "entries": list_entries(collection).num_rows,
        }
    by = {c: [v for col, v, _ in entries if col == c] for c in S.TAKEDOWN_MATCH_COLUMNS}
    removed = remove(collection, by[S.KEY], by[S.URL], by[S.SHA256])
    return {"removed": removed, "entries": list_entries(collection).num_rows}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m curation.takedown",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("collection")
    p.add_argument("action", choices=["add", "remove", "list"])
    p.add_argument("--key", action="append", default=[], help="a sample key (repeatable)")
    p.add_argument("--url", action="append", default=[], help="an image url (repeatable)")
    p.add_argument(
        "--sha256", action="append", default=[], help="sha256 of the image bytes (repeatable)"
    )
    p.add_argument("--file", default=None, help="entries from a .parquet / .csv / text file")
    p.add_argument("--reason", default="", help="why (kept with each added entry)")
    a = p.parse_args(argv)
    setup_logging()
    try:
        out = takedown(a.collection, a.action, a.key, a.url, a.sha256, a.file, a.reason)
    except TakedownError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(out, indent=1 if a.action == "list" else None))


if __name__ == "__main__":
    main()
