"""The web UI's and the kNN server's attacks for `python -m bench.security` (takedown bypass,
UI paths, server bodies, UI type rendering): a placeholder returning none on this branch."""

from __future__ import annotations

import pathlib
from typing import Callable


def web_attacks(
    collection: str, workdir: pathlib.Path
) -> list[tuple[str, str, Callable[[], tuple[bool, str]]]]:
    """(category, name, a callable returning (held, detail)) for each web attack."""
    return []
