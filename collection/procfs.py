"""Process facts from /proc: the one reader of /proc/PID/status (the SQL sandbox's address-space
check, the benchmarks' memory figures)."""

from __future__ import annotations


def process_status_kib(field: str, pid: int | str = "self") -> int | None:
    """A memory field of /proc/PID/status (VmRSS, VmHWM, VmSize...) in KiB; None where absent."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None
