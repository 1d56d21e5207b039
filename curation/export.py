"""`python -m curation.export COLLECTION SPEC --out DIR`: write a subset as training shards.

COLLECTION and DIR are each a local folder or any fsspec URL (`s3://bucket/coll`, ...); the
endpoint and credentials come from fsspec's usual configuration.

Formats (`--format`):
- webdataset (default): img2dataset-named shards `00000.tar`, ... with `{key}.jpg`, `{key}.txt`,
  `{key}.json`, `{key}.img_emb.npy`, `{key}.txt_emb.npy`, and `manifest.json` (the spec, its
  `spec_hash`, the collection's id, CLIP model and dimension, counts, columns): what
  `python -m hdit_train.train --data DIR` reads;
- parquet: img2dataset's parquet output, image bytes in `jpg`, with our columns and embeddings;
- urls: url + caption (+ metadata) parquet for img2dataset to download again, when the source
  shards are elsewhere.

Images are read back from the source shards by byte range (offsets recorded at embed time;
`collection.images`), checked against their sha256 (a changed one is left out and listed in the
shard's `_stats.json`), optionally resized (`--image-size S --resize
center_crop|keep_ratio|none`). One Dask task per output shard, on a LocalCluster or
`--scheduler ADDR`; each shard is written atomically with its `_stats.json` last, so a rerun
skips finished shards and writes the rest exactly as an uninterrupted run would. The takedown
list is checked again as each shard is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from collection import schema as S
from collection.cluster_options import add_cluster_options
from curation.spec import SpecError
from models.runtime import setup_logging


def export(
    collection: str,
    spec: str | dict[str, Any],
    out: str,
    shard_size: int = 10_000,
    image_size: int | None = None,
    resize: str | None = None,
    format: str = S.EXPORT_WEBDATASET,
    scheduler: str | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    client: Any = None,
    untrusted: bool = False,
    on_progress: Callable[[dict[str, int]], None] | None = None,
) -> dict[str, Any]:
    """Export the rows `spec` names on `collection` to `out`; returns the manifest.

    `resize` defaults to center_crop when `image_size` is given, else none. `client` (Python
    API only) reuses a distributed.Client. `untrusted` runs the spec's SQL sandboxed (specs made
    in the web UI). `on_progress` is called with {shards_done, shards, samples, failed} once the
    plan is known and after each shard (the web UI's progress bar). Raises SpecError or
    ExportError (one line each).
    """
    from curation.export_job import (
        run_export,
    )  # heavy (Dask, DuckDB, faiss): after argument parsing, so --help answers at once

    return run_export(
        collection,
        spec,
        out,
        shard_size,
        image_size,
        resize,
        format,
        scheduler,
        workers,
        overwrite,
        client,
        untrusted=untrusted,
        on_progress=on_progress,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m curation.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("collection", help="collection folder or URL")
    parser.add_argument("spec", help="subset spec: a YAML file, or a name in COLLECTION/subsets/")
    parser.add_argument("--out", required=True, help="output folder or URL (a bucket must exist)")
    parser.add_argument("--shard-size", type=int, default=10_000, help="samples per output shard")
    parser.add_argument(
        "--image-size", type=int, default=None, help="resize images to this many pixels"
    )
    parser.add_argument(
        "--resize",
        choices=S.RESIZE_MODES,
        default=None,
        help="how to resize (default center_crop with --image-size, else none)",
    )
    parser.add_argument("--format", choices=S.EXPORT_FORMATS, default=S.EXPORT_WEBDATASET)
    add_cluster_options(parser, "LocalCluster worker processes")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an export of another spec in --out"
    )
    parser.add_argument(
        "--untrusted",
        action="store_true",
        help="run the spec's SQL sandboxed (for specs you did not write)",
    )
    args = parser.parse_args(argv)
    setup_logging()
    from curation.export_shard import ExportError  # with the work it reports on: after parsing

    try:
        manifest = export(
            args.collection,
            args.spec,
            args.out,
            args.shard_size,
            args.image_size,
            args.resize,
            args.format,
            args.scheduler,
            args.workers,
            args.overwrite,
            untrusted=args.untrusted,
        )
    except (SpecError, ExportError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {
                k: manifest[k]
                for k in (
                    S.MANIFEST_SPEC_HASH,
                    S.MANIFEST_COUNT,
                    S.MANIFEST_SHARDS,
                    S.MANIFEST_FORMAT,
                    S.MANIFEST_MISSING,
                )
            }
            | {"out": args.out}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
