"""The process a model runs in: cores, the allocator, logging and progress of long jobs.

Allocator: PyTorch's CPU allocator is plain malloc. glibc serves every block over its mmap
threshold (128 KiB, rising at most to 32 MiB) with a fresh mmap and returns it with munmap on
free, so a tensor allocated every step is zero-filled page by page by the kernel every step.
`keep_freed_memory` stops that. Two uses:
- `pipelines.embed` workers: Dask's nanny sets MALLOC_TRIM_THRESHOLD_, which freezes the mmap
  threshold at 128 KiB and slowed the CLIP forward (bench/results/embed.json); 32 MiB restores it.
- HDiT training on CPU: at 512² activations are 50 MiB+, above any threshold; turning mmap off
  takes the page faults out of every step (bench/results/hdit.json, `scaling`).

Progress: on a terminal a tqdm bar; in a file or CI log one plain line at most every
PROGRESS_EVERY_S seconds and at the end, instead of a carriage-return line per update.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
from typing import Any, Iterable, Iterator

from tqdm import tqdm

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4
_DONE: set[str] = set()


def keep_freed_memory(no_mmap: bool = False) -> bool:
    """Make glibc keep freed memory for reuse; with `no_mmap`, serve every size from the heap.

    Returns whether the settings took (False off glibc). The process's footprint then stays at
    its peak instead of shrinking between steps: right for a worker or a training loop.
    """
    mode = "no_mmap" if no_mmap else "threshold"
    if mode in _DONE:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    if no_mmap:
        ok = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TOP_PAD, 64 << 20))
    else:
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20))
    ok = ok and bool(libc.mallopt(_M_TRIM_THRESHOLD, (2**31 - 1) if no_mmap else (256 << 20)))
    if ok:
        _DONE.add(mode)
        log.debug("malloc: keeping freed memory (%s)", mode)
    return ok


def cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and taskset set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


#: seconds between progress lines when the output is not a terminal
PROGRESS_EVERY_S = 30.0


class _Lines:
    """A stream for tqdm that turns its carriage-return redraws into whole lines."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


class _LogBar(tqdm):
    """tqdm for a log: `set_postfix` shows on the next scheduled line instead of forcing one
    (tqdm's default redraws at once, which made a line per training step)."""

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        super().set_postfix(ordered_dict, refresh=False, **kwargs)


def progress(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr; where stderr is not a terminal, plain lines every PROGRESS_EVERY_S."""
    stream = kwargs.pop("file", None) or sys.stderr
    if not getattr(stream, "isatty", lambda: False)():
        kwargs.setdefault("mininterval", PROGRESS_EVERY_S)
        kwargs.setdefault("ascii", True)
        kwargs.setdefault("ncols", 100)
        return _LogBar(iterable, file=_Lines(stream), **kwargs)
    return tqdm(iterable, file=stream, **kwargs)


#: third-party loggers whose INFO lines are noise in every command's output
_QUIET_LOGGERS = {
    # faiss tries its AVX512 build first and logs the fallback at INFO on every start, although
    # the generic build dispatches AVX2/AVX512 kernels at run time
    "faiss.loader": logging.WARNING,
    "distributed": logging.WARNING,
}


class _QuietOpenClip(logging.Filter):
    """Drops open_clip's INFO lines: it logs through the root logger (no name to quiet), about ten
    lines per model load, which buried a command's own progress."""

    def filter(self, record: logging.LogRecord) -> bool:
        return (
            record.levelno >= logging.WARNING or f"{os.sep}open_clip{os.sep}" not in record.pathname
        )


def setup_logging(level: int = logging.INFO) -> None:
    """The logging every `python -m` command of Sieve starts with:
    one line per record, on stderr."""
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for name, floor in _QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(max(floor, level))
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _QuietOpenClip) for f in handler.filters):
            handler.addFilter(_QuietOpenClip())
    # Dask sets its own loggers' levels from its config when `distributed` is first imported,
    # which commands do after this call; the environment is where that config is read from
    os.environ.setdefault(
        "DASK_LOGGING__DISTRIBUTED", logging.getLevelName(max(logging.WARNING, level)).lower()
    )


@contextlib.contextmanager
def isolated_torch(threads: int | None = None, deterministic: bool = False) -> Iterator[None]:
    """Run a block (a bundled model's training) with its own torch settings, restored afterwards.

    Restored: thread count, deterministic-algorithms mode, uninitialised-memory filling and the
    global RNG state, so a training run called in-process leaves its caller as it found it.
    """
    import torch  # heavy: this module is imported by every command before it parses arguments

    saved = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.utils.deterministic.fill_uninitialized_memory,
        torch.get_rng_state(),
    )
    try:
        if threads:
            torch.set_num_threads(threads)
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.utils.deterministic.fill_uninitialized_memory = (
                False  # NaN-filling every empty() is costly
            )
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
        torch.utils.deterministic.fill_uninitialized_memory = saved[3]
        torch.set_rng_state(saved[4])
