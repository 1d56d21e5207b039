"""`python -m models.train NAME [--out DIR | --if-missing] [--retrain] [--pack] [--KNOB VALUE ...]`.

Builds one of Sieve's bundled models: `sieve-tiny` (the offline CLIP), `watermark` (the
watermark detector) or `sieve-vqgan` (the offline VQGAN CLIP guidance steers); each one's
options are its recipe's knobs (`python -m models.train NAME --help`). Without --out the model
(default recipe only) goes into the cache, where `load_clip` / `load_scorer` /
`models.vqgan.bundled_vqgan` find it; they run this command themselves, in a child process,
when their model is missing or was made with another recipe. `--if-missing` builds only then.

With the default recipe the model is unpacked from the repository's packed copy
(`models/weights/`) when that copy was made with the same recipe; `--retrain` trains from
scratch instead. `--pack` then writes the result as the repository's packed copy (after a
recipe change: retrain, pack, commit).
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from collection.storage import atomic_path
from models.cache import BUNDLED, build_once
from models.runtime import setup_logging


def parser() -> argparse.ArgumentParser:
    """One sub-command per bundled model, its options generated from the model's recipe knobs."""
    p = argparse.ArgumentParser(
        prog="python -m models.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="name", required=True, metavar="NAME")
    for b in BUNDLED.values():
        sp = sub.add_parser(b.name, help=b.about, description=f"Train {b.name} ({b.about}).")
        sp.add_argument("--out", default=None, help="output folder (default: the cache)")
        sp.add_argument(
            "--if-missing",
            action="store_true",
            help="into the cache, only when it lacks this model or holds another recipe",
        )
        sp.add_argument(
            "--retrain",
            action="store_true",
            help="train even when the packed copy matches the recipe",
        )
        sp.add_argument(
            "--pack", action="store_true", help="write the result as the repository's packed copy"
        )
        for knob, default in b.defaults.items():
            sp.add_argument(
                f"--{knob.replace('_', '-')}",
                dest=knob,
                type=type(default),
                default=default,
                help=f"recipe knob (default {default})",
            )
    return p


def main(argv: list[str] | None = None) -> Path:
    p = parser()
    args = p.parse_args(argv)
    setup_logging()
    bundled = BUNDLED[args.name]
    knobs = {k: getattr(args, k) for k in bundled.defaults}
    if args.out is None and knobs != bundled.defaults:
        p.error(
            f"the cache holds {bundled.name}'s default recipe; "
            "pass --out DIR to train with other knobs"
        )
    if args.pack and args.out is None and knobs != bundled.defaults:
        p.error("--pack writes the default recipe's model; drop the knobs")
    # heavy (torch): after parsing, so --help answers at once
    module = importlib.import_module(bundled.module)
    unpack = not args.retrain and knobs == bundled.defaults and bundled.shipped_current()

    def build(dest: str | Path) -> None:
        if unpack:
            module.unpack(dest)
        else:
            module.train(dest, **knobs)

    if args.out is None and args.if_missing and not args.retrain:
        out = bundled.ensure()
    elif args.out:
        build(args.out)
        out = Path(args.out)
    else:
        out = bundled.folder

        def into_cache() -> None:
            with atomic_path(out) as tmp:
                build(tmp)

        build_once(lambda: False, into_cache, out.parent / f".{bundled.name}.lock")
    if args.pack:
        print(module.pack(out))
    print(out)
    return out


if __name__ == "__main__":
    main()
