"""Memorisation audit:
`python -m hdit_train.audit --images DIR --collection COLL [--out REPORT_DIR]`.

For each generated image in DIR: its nearest training samples in the collection's image
index, their similarity and a copy verdict (the duplicates' `copies` rule, applied in
`hdit_train.memorisation.copy_verdicts`). Writes `audit.json` (per image, and the fraction of
generations that copy a training image) and `closest_pairs.png` (generated | training, closest
first) to --out (default DIR/audit). `hdit_train.sample --audit COLL` audits what it samples.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from models.runtime import setup_logging


def audit(
    images: str, collection: str, out: str | None = None, k: int = 5, pairs: int = 16
) -> Path:
    """Audit the image files in `images` against `collection`; returns the report's path."""
    from hdit_train.memorisation import (
        audit as run_audit,
        read_images,
    )  # heavy (torch, faiss): after parsing

    result = run_audit(
        read_images(images), collection, k=k, out=out or Path(images) / "audit", grid_pairs=pairs
    )
    print(
        f"{result.report['n_copies']} of {result.report['n_images']} "
        "generated images copy a training image "
        f"(fraction {result.copy_fraction:.3f}); "
        f"report {result.report_path}, pairs {result.grid_path}"
    )
    return result.report_path


def main(argv: list[str] | None = None) -> Path:
    """The command line: parse it, then `audit`."""
    ap = argparse.ArgumentParser(
        prog="python -m hdit_train.audit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--images", required=True, help="folder of generated images (png, jpg, webp)")
    ap.add_argument(
        "--collection", required=True, help="the training collection (with an image index)"
    )
    ap.add_argument("--out", default=None, help="report folder (default: IMAGES/audit)")
    ap.add_argument("--k", type=int, default=5, help="nearest training samples per image")
    ap.add_argument("--pairs", type=int, default=16, help="closest pairs shown in the grid")
    args = ap.parse_args(argv)
    setup_logging()
    try:
        return audit(args.images, args.collection, args.out, args.k, args.pairs)
    except (FileNotFoundError, ValueError) as exc:  # bad input: one line naming it
        ap.exit(2, f"{ap.prog}: error: {exc}\n")


if __name__ == "__main__":
    main()
