"""Shared benchmark plumbing: every results file records how and where it was measured."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from collection.procfs import process_status_kib
from collection.storage import write_json

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_LIBS = (
    "torch",
    "torchvision",
    "open_clip_torch",
    "numpy",
    "faiss-cpu",
    "faiss-gpu-cu12",
    "dask",
    "distributed",
    "duckdb",
    "pyarrow",
    "pandas",
    "pillow",
    "onnxruntime",
    "nudenet",
    "natten",
    "streamlit",
)


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries whose speed or numerics the figures depend on."""
    out = {"python": platform.python_version()}
    for name in _LIBS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def environment() -> dict[str, Any]:
    """Cores visible to this process, thread settings and machine facts."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        affinity = os.cpu_count()
    env: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cores_used": affinity,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
    }
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        env["torch_threads"] = torch.get_num_threads()
        env["cuda"] = bool(torch.cuda.is_available())
        if env["cuda"]:
            env["gpu"] = torch.cuda.get_device_name(0)
    return env


def write_results(name: str, payload: dict[str, Any], merge: bool = False) -> Path:
    """Write bench/results/NAME.json with the payload plus command, environment and versions.

    With merge=True, keys already in the file and absent from payload are kept, so a
    benchmark can run its parts separately (`--only PART`) into one results file.
    """
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    data: dict[str, Any] = {}
    if merge and path.exists():
        data = json.loads(path.read_text())
    data.update(payload)
    runs = data.get("runs", []) if merge else []
    runs.append(
        {
            "command": "python -m bench."
            + name
            + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""),
            "parts": sorted(payload),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "environment": environment(),
            "versions": library_versions(),
        }
    )
    data["runs"] = runs
    write_json(path, data)
    return path


def pin_one_core(threads: int = 1) -> None:
    """Pin this process to core 0 with one thread: the issues' one-core figures."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        os.sched_setaffinity(0, {0})
    except (AttributeError, OSError):
        pass
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def rss_mb(pid: int | str = "self", field: str = "VmRSS") -> float:
    """A process's memory field (VmRSS, VmHWM, ...) in MB; NaN where the
    kernel does not report it."""
    kib = process_status_kib(field, pid)
    return float("nan") if kib is None else kib / 1024
