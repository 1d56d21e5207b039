"""Shared fixtures: the bundled tiny CLIP, trained once per cache and reused across sessions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_clip():
    """`load_clip("sieve-tiny")` on CPU, with SIEVE_CACHE at <repo>/.cache/sieve unless already set."""
    os.environ.setdefault("SIEVE_CACHE", str(REPO / ".cache" / "sieve"))
    from pipelines.encoders import load_clip

    return load_clip("sieve-tiny", device="cpu")
