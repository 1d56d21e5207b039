"""`python -m curation.subset COLLECTION SPEC [--dry-run]`: resolve a subset spec.

SPEC is a YAML file or the name of one in COLLECTION/subsets/. A spec names rows by clauses
applied in order: `where` (SQL over the catalog's `samples`), `filters` (a preset such as
`laion`, with overrides), `knn` (weighted texts, images, keys or embeddings, with `k` or
`min_similarity`, on the image or text index; `exclude: true` removes the matches), then
`limit` (a random sample drawn with `seed`):

    name: red-stars
    description: red stars, no watermarks
    where: "pwatermark < 0.5"
    filters: {preset: laion, clip_similarity: 0.25}
    knn:
      - {text: "a red star:1|blurry:-0.5", min_similarity: 0.2}
    limit: 1000
    seed: 0

--dry-run prints the rows left after each clause with a few of their captions; otherwise the
resolution is summarised (and written with --out as a parquet of id and key, in order).
--save keeps a checked copy of the spec as COLLECTION/subsets/NAME.yaml (what the web UI's
Subset page writes), so later commands can name it.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from collection import schema as S
from collection.storage import url_to_fs, write_bytes
from curation.spec import NAME, SpecError, read_spec
from models.runtime import setup_logging


def subset(
    collection: str,
    spec: str | dict[str, Any],
    dry_run: bool = False,
    out: str | None = None,
    untrusted: bool = False,
    examples: int = 3,
) -> dict[str, Any]:
    """Resolve `spec` on `collection`; returns a summary (name, spec_hash, count, steps).

    With `out`, the resolved (id, key) rows are written there as parquet, atomically.
    """
    from curation.resolve import (
        resolve,
    )  # heavy (DuckDB, faiss, torch): after argument parsing, so --help answers at once

    res = resolve(collection, spec, untrusted=untrusted, examples=examples if dry_run else 0)
    summary = {
        "name": res.name,
        "spec_hash": res.spec_hash,
        "collection": collection,
        "collection_id": res.collection_id,
        "count": len(res),
        "taken_down": res.blocked,
        "steps": [
            {"clause": s.label, "rows": s.count, **({"captions": s.captions} if dry_run else {})}
            for s in res.steps
        ],
    }
    if out and not dry_run:
        write_keys(out, res)
        summary["out"] = out
    return summary


def save_subset(collection: str, spec: str | dict[str, Any], overwrite: bool = True) -> str:
    """Check `spec` and write it as COLLECTION/subsets/NAME.yaml (atomically); returns the path.

    The name (the spec's `name`, else the file's stem) must be a plain file name; with
    `overwrite` false an existing subset of that name is an error. Nothing is written when the
    spec does not parse.
    """
    from curation.resolve import (
        parse_spec,
    )  # heavy (the clause table imports faiss and torch): after argument parsing

    parsed = parse_spec(spec, collection)
    name = parsed.meta[NAME]
    if not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise SpecError(
            f"{parsed.source.source}: name: {name!r} must be a file name "
            "(letters, digits, '-', '_', '.')"
        )
    path = S.CollectionLayout(collection).subset(name)
    fs, fpath = url_to_fs(path)
    if not overwrite and fs.exists(fpath):
        raise SpecError(f"{path}: a subset named {name!r} exists already")
    doc = dict(read_spec(spec, collection).doc)
    doc[NAME] = name
    write_bytes(path, yaml.safe_dump(doc, sort_keys=False, allow_unicode=True).encode("utf-8"))
    return path


def write_keys(out: str, res: Any) -> None:
    """The resolution's (id, key) rows, in order, as parquet (atomically)."""
    buf = io.BytesIO()
    pq.write_table(
        pa.table({S.ID: pa.array(res.ids, pa.int64()), S.KEY: pa.array(res.keys, pa.string())}), buf
    )
    write_bytes(out, buf.getvalue())


def print_dry_run(summary: dict[str, Any]) -> None:
    """The rows after each clause, with example captions."""
    print(f"subset {summary['name']}  spec_hash {summary['spec_hash']}  on {summary['collection']}")
    width = max(len(s["clause"]) for s in summary["steps"])
    for s in summary["steps"]:
        print(f"  {s['clause']:<{width}}  {s['rows']:>10,d}")
        for caption in s.get("captions", []):
            print(f"      e.g. {caption}")
    print(f"{summary['count']:,d} rows")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m curation.subset",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("collection", help="collection folder")
    parser.add_argument("spec", help="subset spec: a YAML file, or a name in COLLECTION/subsets/")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the rows left after each clause"
    )
    parser.add_argument(
        "--out", default=None, help="write the resolved (id, key) rows here as parquet"
    )
    parser.add_argument(
        "--untrusted",
        action="store_true",
        help="run the spec's SQL sandboxed (for specs you did not write)",
    )
    parser.add_argument(
        "--examples", type=int, default=3, help="captions shown per clause in a dry run"
    )
    parser.add_argument(
        "--save", action="store_true", help="also keep the spec as COLLECTION/subsets/NAME.yaml"
    )
    args = parser.parse_args(argv)
    setup_logging()
    try:
        summary = subset(
            args.collection, args.spec, args.dry_run, args.out, args.untrusted, args.examples
        )
        if args.save:
            summary["saved"] = save_subset(args.collection, args.spec)
    except ValueError as exc:  # SpecError and CollectionError: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print_dry_run(summary)
        if "saved" in summary:
            print(f"saved as {summary['saved']}")
    else:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
