"""Run one command and watch its memory: the driver process and every process under it.

`python -m bench.scale` times each curation stage as its own command in a subprocess, so the
figures are what a user sees; a sampler thread reads /proc every SAMPLE_S for the process
tree (the command is the driver; its descendants, Dask's nannies and workers, are workers) and
keeps each process's VmHWM, the kernel's own high-water mark, so a peak between two samples is
not missed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

from bench.common import rss_mb

#: seconds between two reads of the process tree
SAMPLE_S = 0.25


@dataclass
class Watched:
    """What one command did: exit status, wall seconds, peaks in MB, its output's tail."""

    rc: int
    seconds: float
    driver_peak_rss_mb: float
    worker_peak_rss_mb: float
    workers_seen: int
    tail: str = ""
    worker_peaks: dict[int, float] = field(default_factory=dict)
    timed_out: bool = False
    #: CPU seconds (user + system) of the command and every process it waited for (its Dask
    #: workers): the cost that does not stretch when other jobs share the cores
    cpu_seconds: float = 0.0
    #: the driver's peak anonymous memory (RssAnon, sampled): what it allocates, without the
    #: file pages of memory-mapped embeddings that VmHWM also counts
    driver_peak_anon_mb: float = 0.0


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process visible now."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                stat = fh.read()
        except OSError:  # exited between the listing and the read
            continue
        # the command name may hold spaces and parentheses: fields start after the last ')'
        out[int(name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def descendants(pid: int) -> list[int]:
    """Every live process under `pid` (children, their children, ...)."""
    parents = _parents()
    below: dict[int, list[int]] = {}
    for child, parent in parents.items():
        below.setdefault(parent, []).append(child)
    found, todo = [], list(below.get(pid, []))
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(below.get(p, []))
    return found


def _hwm(pid: int) -> float | None:
    try:
        value = rss_mb(pid, "VmHWM")
    except (OSError, ValueError):  # gone, or a kernel thread without memory fields
        return None
    return None if value != value else value  # NaN: not reported


def _reap(proc: subprocess.Popen, until: float | None) -> tuple[int, float, bool]:
    """Wait for `proc` (killing its process group at `until`); (exit code, CPU seconds of it
    and of the children it reaped, whether it was killed). `os.wait4` gives the CPU time,
    which `Popen.wait` throws away."""
    timed_out = False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if until is not None and time.perf_counter() > until and not timed_out:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.05)
    rc = os.waitstatus_to_exitcode(status)
    proc.returncode = rc  # reaped here: Popen must not wait for it again
    return rc, usage.ru_utime + usage.ru_stime, timed_out


def watch(
    cmd: Sequence[str],
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    timeout: float | None = None,
) -> Watched:
    """Run `cmd`, sampling the memory of it and its descendants until it exits; after
    `timeout` seconds its whole process group is killed (rc -9, `timed_out`)."""
    start = time.perf_counter()
    log_path = f"/tmp/bench-scale-{os.getpid()}-{time.time_ns()}.log"
    with open(log_path, "w+b") as log_fh:
        proc = subprocess.Popen(
            cmd,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,  # its own process group: a timeout ends the workers too
        )
        driver = anon = 0.0
        workers: dict[int, float] = {}
        done = threading.Event()

        def sample() -> None:
            nonlocal driver, anon
            while not done.is_set():
                peak = _hwm(proc.pid)
                if peak is not None:
                    driver = max(driver, peak)
                try:
                    anon = max(anon, rss_mb(proc.pid, "RssAnon"))
                except (OSError, ValueError):  # exited between two samples
                    pass
                for child in descendants(proc.pid):
                    peak = _hwm(child)
                    if peak is not None:
                        workers[child] = max(workers.get(child, 0.0), peak)
                done.wait(SAMPLE_S)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc, cpu, timed_out = _reap(proc, start + timeout if timeout else None)
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
        log_fh.seek(0)
        tail = log_fh.read().decode("utf-8", "replace")[-4000:]
    os.unlink(log_path)
    return Watched(
        rc,
        seconds,
        round(driver, 1),
        round(max(workers.values(), default=0.0), 1),
        len(workers),
        tail,
        workers,
        timed_out,
        round(cpu, 2),
        round(anon, 1),
    )
