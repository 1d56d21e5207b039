"""models.runtime.keep_freed_memory: with mmap off, big activations reuse freed memory
instead of page-faulting."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = r"""
import resource, sys, torch
from models.runtime import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory(no_mmap=True)
torch.manual_seed(0)
w = torch.randn(512, 512, requires_grad=True)
x = torch.randn(32768, 512)  # 64 MiB activations, above glibc's largest mmap threshold
def step():
    torch.nn.functional.gelu(x @ w).square().mean().backward()
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_no_mmap_cuts_page_faults_of_a_training_step():
    def faults(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True
        )
        return int(out.stdout.strip().splitlines()[-1])

    plain, tuned = faults("plain"), faults("tuned")
    assert plain > 3 * (64 << 20) // 4096  # each step maps and faults in its activations afresh
    assert tuned < plain / 2
