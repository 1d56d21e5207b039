"""Where Sieve keeps what it builds for itself (the bundled models): `$SIEVE_CACHE` or ~/.cache/sieve."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache folder (`$SIEVE_CACHE`, else `~/.cache/sieve`), created on demand."""
    root = Path(os.environ.get("SIEVE_CACHE") or Path.home() / ".cache" / "sieve").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root
