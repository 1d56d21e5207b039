"""models.runtime (progress lines, logging) and collection.storage
(atomic writes, collection.json)."""

from __future__ import annotations

import io
import logging
import os
import time
from pathlib import Path

import pytest

from collection.storage import atomic_path, read_collection_json, write_bytes, write_collection_json
from models.runtime import progress, setup_logging


def test_progress_in_a_file_is_plain_lines_and_few():
    """About a second of updates: a terminal bar would redraw ~10 times;
    a log gets start and end."""
    out = io.StringIO()
    for _ in progress(range(1000), file=out, desc="fast loop"):
        time.sleep(0.001)
    text = out.getvalue()
    assert text and "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert 1 <= len(lines) <= 2, lines
    assert "fast loop" in lines[-1] and "1000/1000" in lines[-1]


def test_progress_postfix_waits_for_the_next_line():
    """Training loops set a postfix (the loss) every step: in a log that must
    not force a line each time."""
    out = io.StringIO()
    bar = progress(range(300), file=out, desc="training")
    for step in bar:
        bar.set_postfix(loss=f"{1 / (step + 1):.3f}")
        time.sleep(0.001)
    lines = out.getvalue().splitlines()
    assert 1 <= len(lines) <= 2, lines
    assert "loss=0.003" in lines[-1]  # the last postfix shows on the closing line


def test_progress_with_a_total_and_updates_by_hand():
    out = io.StringIO()
    with progress(total=1000, file=out, desc="shards", unit="shard") as bar:
        for _ in range(1000):
            bar.update(1)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and 1 <= len(lines) <= 2, lines
    assert "1000/1000" in lines[-1]


def test_setup_logging_quiets_faiss_loader():
    logger = logging.getLogger("faiss.loader")
    before = logger.level
    try:
        logger.setLevel(logging.NOTSET)
        setup_logging()
        assert logger.getEffectiveLevel() >= logging.WARNING
        assert not logger.isEnabledFor(logging.INFO)
    finally:
        logger.setLevel(before)


def test_open_clip_info_lines_are_dropped_but_its_warnings_kept():
    """open_clip logs through the root logger: its INFO records are filtered at
    the handler by source file."""
    setup_logging()
    handlers = logging.getLogger().handlers
    assert handlers

    def shown(level: int, path: str) -> bool:
        record = logging.LogRecord("root", level, path, 1, "message", None, None)
        return all(all(f.filter(record) for f in h.filters) for h in handlers)

    chatter = os.path.join(os.sep, "venv", "site-packages", "open_clip", "factory.py")
    assert not shown(logging.INFO, chatter)
    assert shown(logging.WARNING, chatter)
    assert shown(logging.INFO, os.path.join(os.sep, "repo", "pipelines", "embed.py"))


def _leftovers(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != name)


def test_atomic_path_keeps_the_old_file_when_the_block_raises(tmp_path):
    target = tmp_path / "index.faiss"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="writer died"):
        with atomic_path(target) as tmp:
            Path(tmp).write_bytes(b"half of the new")
            raise RuntimeError("writer died")
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path, target.name) == []


def test_atomic_path_writes_a_new_file(tmp_path):
    target = tmp_path / "sub" / "ckpt.bin"
    with atomic_path(target) as tmp:
        assert not os.path.exists(target)
        Path(tmp).write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert _leftovers(target.parent, target.name) == []


def test_atomic_path_replaces_a_folder_whole(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights.bin").write_bytes(b"old")
    (target / "stale.txt").write_text("from the old folder")
    with atomic_path(target) as tmp:
        os.makedirs(tmp)
        (Path(tmp) / "weights.bin").write_bytes(b"new")
        assert (
            target / "weights.bin"
        ).read_bytes() == b"old"  # readers see the old folder meanwhile
    assert sorted(p.name for p in target.iterdir()) == ["weights.bin"]
    assert (target / "weights.bin").read_bytes() == b"new"
    assert _leftovers(tmp_path, target.name) == []


def test_atomic_path_failed_folder_keeps_the_old_one(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights.bin").write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            os.makedirs(tmp)
            (Path(tmp) / "weights.bin").write_bytes(b"partial")
            raise KeyboardInterrupt
    assert (target / "weights.bin").read_bytes() == b"old"
    assert _leftovers(tmp_path, target.name) == []


def test_write_bytes_to_a_local_path(tmp_path):
    target = tmp_path / "a" / "b" / "part.npy"
    write_bytes(str(target), b"first")
    write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert _leftovers(target.parent, target.name) == []


def test_collection_json_round_trip_and_absent(tmp_path):
    assert read_collection_json(str(tmp_path)) == {}
    doc = write_collection_json(str(tmp_path), {"clip_model": "sieve-tiny", "emb_dim": 128})
    back = read_collection_json(str(tmp_path))
    assert back == doc and back["clip_model"] == "sieve-tiny" and "schema_version" in back
