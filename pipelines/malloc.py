"""Keep freed tensor memory in the process (glibc only), so large CPU tensors stop page-faulting.

PyTorch's CPU allocator is plain malloc. glibc serves every block over its mmap threshold
(128 KiB, rising at most to 32 MiB) with a fresh mmap and returns it with munmap on free, so a
tensor allocated every step is zero-filled page by page by the kernel every step. Two uses:
- `pipelines.embed` workers: Dask's nanny sets MALLOC_TRIM_THRESHOLD_, which freezes the mmap
  threshold at 128 KiB, which halved CLIP throughput; 32 MiB restores it (bench/embed.py).
- HDiT training on CPU: at 512² activations are 50 MiB+, above any threshold; turning mmap off
  moved 4 s of a 11 s fwd+bwd step out of the kernel (bench/hdit.py).
"""

from __future__ import annotations

import ctypes
import logging
import sys

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
