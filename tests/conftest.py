"""Shared fixtures: the bundled tiny CLIP, trained once into the shared cache and reused across sessions.

The tests use the same cache as the demo (`$SIEVE_CACHE`, else ~/.cache/sieve): a cached model
is current only when it was trained with today's recipe (models.cache), so sharing is safe.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_clip():
    """`load_clip("sieve-tiny")` on CPU (trained first, in a child process, if the cache lacks it)."""
    from models.clip import load_clip

    return load_clip("sieve-tiny", device="cpu")
