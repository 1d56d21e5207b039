"""The bundled models' build-once helper: builds when missing, never twice."""

from __future__ import annotations

from pathlib import Path

from pipelines.cache import build_once


def test_build_once_builds_only_when_missing(tmp_path: Path) -> None:
    target = tmp_path / "model.bin"
    calls: list[int] = []

    def build() -> None:
        calls.append(1)
        target.write_text("weights")

    build_once(target.exists, build, tmp_path / ".lock")
    build_once(target.exists, build, tmp_path / ".lock")
    assert calls == [1]
    assert target.read_text() == "weights"
