"""`python -m models.train NAME [--out DIR] [--KNOB VALUE ...]`: train one of Sieve's bundled models.

NAME is `sieve-tiny` (the offline CLIP) or `watermark` (the watermark detector); each one's
options are its recipe's knobs (`python -m models.train NAME --help`). Without --out the
model goes into the cache, where `load_clip` / `load_scorer` find it; they run this command
themselves, in a child process, when their model is missing or was trained with another recipe.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from curation.storage import atomic_path
from models.cache import BUNDLED
from models.runtime import setup_logging


def parser() -> argparse.ArgumentParser:
    """One sub-command per bundled model, its options generated from the model's recipe knobs."""
    p = argparse.ArgumentParser(prog="python -m models.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="name", required=True, metavar="NAME")
    for b in BUNDLED.values():
        sp = sub.add_parser(b.name, help=b.about, description=f"Train {b.name} ({b.about}).")
        sp.add_argument("--out", default=None, help=f"output folder (default: the cache, {b.folder})")
        for knob, default in b.defaults.items():
            sp.add_argument(f"--{knob.replace('_', '-')}", dest=knob, type=type(default), default=default,
                            help=f"recipe knob (default {default})")
    return p


def main(argv: list[str] | None = None) -> Path:
    args = parser().parse_args(argv)
    setup_logging()
    bundled = BUNDLED[args.name]
    knobs = {k: getattr(args, k) for k in bundled.defaults}
    module = importlib.import_module(bundled.module)  # heavy (torch): after parsing, so --help answers at once
    if args.out:
        out = Path(module.train(args.out, **knobs))
    else:
        with atomic_path(bundled.folder) as tmp:
            module.train(tmp, **knobs)
        out = bundled.folder
    print(out)
    return out


if __name__ == "__main__":
    main()
