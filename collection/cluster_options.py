"""The command-line options of every Dask job, `--scheduler` and `--workers`, defined once.

It imports no Dask (`collection.cluster` does), so a command that adds them answers `--help` at
once; what `--workers` means (how many, and whether 0 runs the tasks in this process) is the
command's to say.
"""

from __future__ import annotations

import argparse

#: `--workers` of the jobs that run their tasks on a LocalCluster unless told 0 (dedup, the map,
#: uniqueness)
WORKERS_DEFAULT_CORES = "LocalCluster workers (default: one per core; 0: no Dask)"


def worker_count(text: str) -> int:
    """`--workers`' value: a whole number of workers, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--workers: {text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"--workers: {value} is negative")
    return value


def add_cluster_options(
    parser: argparse.ArgumentParser | argparse._ActionsContainer,
    workers_help: str = WORKERS_DEFAULT_CORES,
) -> None:
    """Add `--scheduler ADDRESS` and `--workers N` (both default None) to `parser`, or to a group
    of it (a mutually exclusive one where a command takes one or the other)."""
    parser.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="run the tasks on this Dask scheduler, e.g. tcp://host:8786",
    )
    parser.add_argument(
        "--workers", type=worker_count, default=None, metavar="N", help=workers_help
    )
