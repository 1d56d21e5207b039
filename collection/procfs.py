"""Process facts from /proc: the one reader of /proc/PID/status (the SQL sandbox's address-space
check, the benchmarks' memory figures) and of the TCP sockets a process listens on (the checks
that nothing the web UI starts listens beyond what it was told)."""

from __future__ import annotations

import os
import socket
import sys

#: /proc/net/tcp's state code for a listening socket
_LISTEN = "0A"


def process_status_kib(field: str, pid: int | str = "self") -> int | None:
    """A memory field of /proc/PID/status (VmRSS, VmHWM, VmSize...) in KiB; None where absent."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def listening_sockets(pid: int | str = "self") -> list[tuple[str, int]]:
    """(address, port) of every TCP socket the process listens on, IPv4 and IPv6: the sockets
    of /proc/PID/net/tcp{,6} in the listening state whose inode is one of the process's fds."""
    fd_dir = f"/proc/{pid}/fd"
    inodes = set()
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:  # closed between the listing and the read
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            with open(f"/proc/{pid}/net/{table}") as fh:
                lines = fh.read().splitlines()[1:]
        except FileNotFoundError:  # a kernel without IPv6
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != _LISTEN or fields[9] not in inodes:
                continue
            address, port = fields[1].split(":")
            found.append((_address(address, family), int(port, 16)))
    return found


def _address(hex_text: str, family: int) -> str:
    """/proc/net/tcp's address (32-bit words in host byte order) as text."""
    raw = bytes.fromhex(hex_text)
    if sys.byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(family, raw)
