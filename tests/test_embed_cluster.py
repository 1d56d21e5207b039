"""The embed job's cluster and worker policy: workers per core or GPU, decode threads, the
workers' environment, and a command line that answers `--help` without importing the work."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from pipelines import embed_worker
from pipelines.embed import embed

ROOT = Path(__file__).resolve().parent.parent


def test_cli_help_is_instant_and_imports_nothing_heavy():
    code = (
        "import sys, pipelines.embed; "
        "heavy = [m for m in ('torch', 'dask', 'distributed', 'open_clip') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.embed", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--scheduler" in out and "--precision" in out


def test_default_cluster_uses_every_core_without_idle_workers(monkeypatch):
    from pipelines import embed_cluster as E

    monkeypatch.setattr(E, "cores", lambda: 8)
    assert E.default_cluster_size() == (8, 1)  # CPU: a single-thread worker per core
    assert E.default_cluster_size(tasks=3) == (3, 2)  # no more workers than shards
    assert E.default_cluster_size(gpu=True) == (2, 4)  # GPU: a worker per 4 cores, sharing it
    assert E.default_cluster_size(gpu=True, tasks=1) == (1, 8)
    assert E.default_cluster_size(threads_per_worker=4) == (2, 4)
    assert E.default_cluster_size(workers=2) == (2, 4)


def test_workers_spread_over_several_gpus(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for name, expected in ((0, "cuda:0"), (3, "cuda:1"), ("2", "cuda:0")):
        # the worker module's own name for distributed.get_worker (imported at its top)
        monkeypatch.setattr(
            embed_worker, "get_worker", lambda n=name: types.SimpleNamespace(name=n)
        )
        assert embed_worker.worker_device(None) == embed_worker.worker_device("cuda") == expected
    # a worker named otherwise keeps the device it was given
    monkeypatch.setattr(embed_worker, "get_worker", lambda: types.SimpleNamespace(name="gpu-a"))
    assert embed_worker.worker_device("cuda") == "cuda" and embed_worker.worker_device(None) is None
    assert (
        embed_worker.worker_device("cuda:1") == "cuda:1"
        and embed_worker.worker_device("cpu") == "cpu"
    )
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert embed_worker.worker_device(None) is None


def test_decode_threads_default_and_validation():
    fake = types.SimpleNamespace(device="cuda:0")
    assert embed_worker.decode_threads(fake, 16) == 15
    assert embed_worker.decode_threads(fake, 1) == 1
    assert embed_worker.decode_threads(types.SimpleNamespace(device="cpu"), 8) == 1
    assert embed_worker.decode_threads(types.SimpleNamespace(device="cpu"), 8, requested=4) == 4
    with pytest.raises(ValueError, match="decode_threads"):
        embed_worker.decode_threads(fake, 16, requested=0)
    with pytest.raises(ValueError, match="decode_threads"):
        embed("unused", "unused", decode_threads=0)


def test_single_thread_cpu_workers_share_one_malloc_arena(monkeypatch):
    """CPU workers of one thread start with MALLOC_ARENA_MAX=1 (a user's value wins); GPU ones
    don't."""
    from pipelines import embed_cluster as E

    def arena_max():
        return os.environ.get("MALLOC_ARENA_MAX")

    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    for kwargs, expected in (({}, "1"), ({"gpu": True}, None)):
        with E.start_client(None, 1, **kwargs) as cluster:
            assert set(cluster.client.run(arena_max).values()) == {expected}, kwargs
        assert "MALLOC_ARENA_MAX" not in os.environ  # the nanny's copy here is undone
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    with E.start_client(None, 1) as cluster:
        assert set(cluster.client.run(arena_max).values()) == {"4"}
    assert os.environ["MALLOC_ARENA_MAX"] == "4"
