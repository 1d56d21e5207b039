"""Train an HDiT on webdataset shards: `python -m hdit_train.train --data D --config C --out RUN`.

`--data` is a curation export (its manifest names the subset spec and CLIP model), plain
img2dataset shards, a .tar or a glob. The run folder is described in `hdit_train.run`;
`--resume` continues bit-for-bit from the checkpoint. The loop is `hdit_train.train_loop`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from models.runtime import setup_logging


def train(
    data: str,
    config: str,
    out: str,
    resume: bool = False,
    max_steps: int | None = None,
    max_minutes: float | None = None,
) -> Path:
    """Train (or resume) a run; returns the run folder."""
    from hdit_train.train_loop import (
        fit,
    )  # heavy (torch): after argument parsing, so --help answers at once

    return fit(data, config, out, resume, max_steps, max_minutes)


def main(argv: list[str] | None = None) -> None:
    """The command line: parse it, then `train`."""
    ap = argparse.ArgumentParser(
        prog="python -m hdit_train.train", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--data", required=True, help="export folder, shard folder, a .tar or a glob")
    ap.add_argument("--config", required=True, help="YAML config (see hdit_train/configs/)")
    ap.add_argument("--out", required=True, help="run folder")
    ap.add_argument(
        "--resume", action="store_true", help="continue from RUN/checkpoint.safetensors"
    )
    ap.add_argument("--max-steps", type=int, default=None, help="override train.max_steps")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop after this wall time")
    args = ap.parse_args(argv)
    setup_logging()
    print(train(args.data, args.config, args.out, args.resume, args.max_steps, args.max_minutes))


if __name__ == "__main__":
    main()
