"""Where Sieve keeps what it builds for itself (the bundled models): `$SIEVE_CACHE` or ~/.cache/sieve."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def cache_dir() -> Path:
    """The cache folder (`$SIEVE_CACHE`, else `~/.cache/sieve`), created on demand."""
    root = Path(os.environ.get("SIEVE_CACHE") or Path.home() / ".cache" / "sieve").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def build_once(ready: Callable[[], bool], build: Callable[[], None], lock_path: Path) -> None:
    """Run `build` unless `ready()`; one process at a time (file lock), re-checking after the wait.

    The bundled models train themselves on first use; when several Dask workers or test
    processes ask at once, one trains and the others wait, then find the result.
    """
    import fcntl

    if ready():
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not ready():
            build()
