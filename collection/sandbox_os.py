"""The OS layers around the untrusted-SQL worker, on top of DuckDB's own lock (Linux).

DuckDB's security page says SQL from people you do not trust needs an OS-level sandbox. The
worker puts itself in one before it reads a query:
- `enter_namespaces()`, its first act while it has one thread: a user namespace of its own
  (its uid and gid mapped to themselves) and a network namespace with no interface up, so no
  query reaches any network, loopback included;
- `confine()`, before anything starts a thread (every layer binds the calling thread and the
  threads it starts later): `no_new_privs`; Landlock allowing reads of the files in the folders
  holding the collection's metadata parts (a rule on a folder still holds when a file in it is
  replaced atomically; a rule on the file would not) and of the Python runtime's libraries
  (lazy imports), reads and writes in the worker's own temporary folder, no TCP bind or
  connect, no signals or abstract sockets outside the worker; a seccomp filter refusing new
  processes, sockets, exec, namespaces, mounts, ptrace, bpf and kernel-administration calls; every
  capability dropped.
Each layer is applied on its own and then probed; where the kernel refuses one, the worker runs
with the others and its report says which is missing and why. Standard library and ctypes only:
this module runs before the worker imports anything that could start a thread.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import socket
import struct
import sys
import sysconfig
from typing import Iterable, Sequence

#: the layer names, in the order they are applied; each maps to {"in_force": bool, "detail": str}
LAYERS = (
    "user_namespace",
    "network",
    "no_new_privs",
    "landlock",
    "seccomp",
    "capabilities",
)

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_PR_SET_NO_NEW_PRIVS, _PR_GET_NO_NEW_PRIVS = 38, 39
_PR_GET_SECCOMP, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 21, 22, 2
_PR_CAPBSET_DROP = 24

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int


def layer(in_force: bool, detail: str) -> dict[str, object]:
    """One layer's entry in a worker's report."""
    return {"in_force": bool(in_force), "detail": detail}


def _errno_text() -> str:
    code = ctypes.get_errno()
    return f"{errno.errorcode.get(code, code)} ({os.strerror(code)})"


def _prctl(option: int, arg2: int = 0) -> int:
    return _libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(0), ctypes.c_ulong(0), 0)


def threads_now() -> int:
    """Threads of this process (every layer below binds the calling thread and later ones)."""
    return len(os.listdir("/proc/self/task"))


# ---- namespaces -------------------------------------------------------------------------
def _write(path: str, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)


def _netns() -> str:
    return os.readlink("/proc/self/ns/net")


def enter_namespaces() -> dict[str, dict[str, object]]:
    """A user namespace and an empty network namespace for this process: call it first, while
    the process has one thread. Falls back to the network namespace alone where user namespaces
    are refused but this process may create one (CAP_SYS_ADMIN); reports both layers."""
    out: dict[str, dict[str, object]] = {}
    before = _netns()
    if threads_now() != 1:
        reason = f"the process already runs {threads_now()} threads"
        out["user_namespace"] = layer(False, f"missing: {reason}")
        out["network"] = layer(False, f"missing: {reason}")
        return out
    uid, gid = os.getuid(), os.getgid()
    if _libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) == 0:
        try:
            _write("/proc/self/setgroups", "deny")
            _write("/proc/self/uid_map", f"{uid} {uid} 1")
            _write("/proc/self/gid_map", f"{gid} {gid} 1")
            out["user_namespace"] = layer(True, f"own user namespace, uid {uid} and gid {gid} only")
        except OSError as exc:
            out["user_namespace"] = layer(
                False, f"missing: entered, but the id maps were refused: {exc.strerror}"
            )
    else:
        why = _errno_text()
        out["user_namespace"] = layer(False, f"missing: unshare(CLONE_NEWUSER) refused: {why}")
        if _libc.unshare(_CLONE_NEWNET) != 0:
            out["network"] = layer(
                False, f"missing: unshare(CLONE_NEWNET) refused: {_errno_text()}"
            )
            return out
    out["network"] = _probe_network(before)
    return out


def _probe_network(before: str) -> dict[str, object]:
    """In force when this process has its own network namespace and not even loopback answers."""
    if _netns() == before:
        return layer(False, "missing: still in the caller's network namespace")
    try:
        with open("/proc/self/net/dev") as fh:
            devices = [line.split(":")[0].strip() for line in fh.readlines()[2:]]
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            probe.connect(("127.0.0.1", 9))
    except OSError as exc:
        if exc.errno in (errno.ENETUNREACH, errno.EADDRNOTAVAIL, errno.EPERM, errno.EACCES):
            return layer(True, f"own network namespace, interfaces {devices} all down")
        return layer(False, f"missing: loopback probe failed unexpectedly: {exc}")
    return layer(False, "missing: a connection to 127.0.0.1 succeeded inside the namespace")


# ---- landlock -----------------------------------------------------------------------------
_LANDLOCK_CREATE_RULESET, _LANDLOCK_ADD_RULE, _LANDLOCK_RESTRICT_SELF = 444, 445, 446
_VERSION = 1  # landlock_create_ruleset's flag asking for the ABI version
_RULE_PATH_BENEATH = 1
_FS_EXECUTE, _FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_REMOVE_DIR, _FS_REMOVE_FILE, _FS_MAKE_DIR, _FS_MAKE_REG = 1 << 4, 1 << 5, 1 << 7, 1 << 8
_FS_TRUNCATE = 1 << 14
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1
_SCOPE_ABSTRACT_UNIX, _SCOPE_SIGNAL = 1 << 0, 1 << 1
#: file-system rights each ABI knows (every one of them is handled: denied unless a rule allows)
_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}


def landlock_abi() -> int:
    """The kernel's Landlock ABI version (0 where it has none or it is disabled)."""
    abi = _libc.syscall(_LANDLOCK_CREATE_RULESET, None, ctypes.c_long(0), ctypes.c_long(_VERSION))
    return max(0, int(abi))


def runtime_dirs() -> list[str]:
    """The Python runtime's library folders (stdlib, extension modules, site-packages): read-only
    for the worker, so a module or codec imported lazily still loads. The project's own folders
    are not among them: the worker imported its modules before it was confined."""
    paths = sysconfig.get_paths()
    dirs = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    prefixes = tuple(os.path.realpath(p) + os.sep for p in (sys.prefix, sys.base_prefix))
    dirs |= {p for p in sys.path if p and os.path.realpath(p).startswith(prefixes)}
    return sorted(d for d in dirs if os.path.isdir(d))


def _add_rule(ruleset: int, path: str, access: int) -> None:
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        attr = struct.pack("=Qi", access, fd)  # struct landlock_path_beneath_attr (packed)
        args = (ctypes.c_long(ruleset), ctypes.c_long(_RULE_PATH_BENEATH), attr, ctypes.c_long(0))
        if _libc.syscall(_LANDLOCK_ADD_RULE, *args) != 0:
            raise OSError(ctypes.get_errno(), f"landlock_add_rule({path}): {_errno_text()}")
    finally:
        os.close(fd)


def _landlock(
    data: Sequence[str], read_dirs: Sequence[str], write_dirs: Sequence[str]
) -> dict[str, object]:
    abi = landlock_abi()
    if abi < 1:
        return layer(False, f"missing: the kernel has no Landlock ({_errno_text()})")
    handled = _FS_BY_ABI[max(a for a in _FS_BY_ABI if a <= abi)]
    net = _NET_BIND_TCP | _NET_CONNECT_TCP if abi >= 4 else 0
    scoped = _SCOPE_ABSTRACT_UNIX | _SCOPE_SIGNAL if abi >= 6 else 0
    attr = struct.pack("=QQQ", handled, net, scoped)[: 8 if abi < 4 else 16 if abi < 6 else 24]
    ruleset = _libc.syscall(
        _LANDLOCK_CREATE_RULESET, attr, ctypes.c_long(len(attr)), ctypes.c_long(0)
    )
    if ruleset < 0:
        return layer(False, f"missing: landlock_create_ruleset refused: {_errno_text()}")
    file_read = _FS_READ_FILE
    dir_read = _FS_READ_FILE | _FS_READ_DIR
    dir_write = dir_read | _FS_WRITE_FILE | _FS_REMOVE_DIR | _FS_REMOVE_FILE | _FS_MAKE_DIR
    dir_write |= _FS_MAKE_REG | (_FS_TRUNCATE if abi >= 3 else 0)
    try:
        for path in data:
            _add_rule(ruleset, path, file_read)
        for path in read_dirs:
            _add_rule(ruleset, path, dir_read)
        for path in write_dirs:
            _add_rule(ruleset, path, dir_write)
        if _libc.syscall(_LANDLOCK_RESTRICT_SELF, ctypes.c_long(ruleset), ctypes.c_long(0)) != 0:
            return layer(False, f"missing: landlock_restrict_self refused: {_errno_text()}")
    except OSError as exc:
        return layer(False, f"missing: {exc.strerror or exc}")
    finally:
        os.close(ruleset)
    try:
        os.listdir("/")
    except PermissionError:
        extras = ", no TCP bind or connect" if net else ""
        extras += ", no signals or abstract sockets beyond itself" if scoped else ""
        return layer(
            True,
            f"ABI {abi}: reads files in {len(data)} data folders and the Python runtime "
            f"({len(read_dirs)} folders), writes only its temp folder{extras}",
        )
    return layer(False, "missing: restricted, yet '/' can still be listed")


# ---- seccomp ------------------------------------------------------------------------------
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
#: syscalls refused with EPERM: (x86_64, aarch64) numbers, None where the arch lacks the call
_DENIED = {
    "socket": (41, 198),
    "socketpair": (53, 199),
    "execve": (59, 221),
    "execveat": (322, 281),
    "fork": (57, None),
    "vfork": (58, None),
    "ptrace": (101, 117),
    "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271),
    "kcmp": (312, 272),
    "pidfd_getfd": (438, 438),
    "unshare": (272, 97),
    "setns": (308, 268),
    "mount": (165, 40),
    "umount2": (166, 39),
    "pivot_root": (155, 41),
    "chroot": (161, 51),
    "open_tree": (428, 428),
    "move_mount": (429, 429),
    "fsopen": (430, 430),
    "fsconfig": (431, 431),
    "fsmount": (432, 432),
    "fspick": (433, 433),
    "mount_setattr": (442, 442),
    "bpf": (321, 280),
    "perf_event_open": (298, 241),
    "userfaultfd": (323, 282),
    "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427),
    "keyctl": (250, 219),
    "add_key": (248, 217),
    "request_key": (249, 218),
    "kexec_load": (246, 104),
    "kexec_file_load": (320, 294),
    "init_module": (175, 105),
    "finit_module": (313, 273),
    "delete_module": (176, 106),
    "reboot": (169, 142),
    "swapon": (167, 224),
    "swapoff": (168, 225),
    "acct": (163, 89),
    "settimeofday": (164, 170),
    "clock_settime": (227, 112),
    "clock_adjtime": (305, 266),
    "adjtimex": (159, 171),
    "sethostname": (170, 161),
    "setdomainname": (171, 162),
    "syslog": (103, 116),
    "quotactl": (179, 60),
    "open_by_handle_at": (304, 265),
    "name_to_handle_at": (303, 264),
    "fanotify_init": (300, 262),
    "personality": (135, 92),
    "mknod": (133, None),
    "mknodat": (259, 33),
    "iopl": (172, None),
    "ioperm": (173, None),
    "uselib": (134, None),
    "vhangup": (153, 58),
}
_CLONE, _CLONE3 = {"x86_64": 56, "aarch64": 220}, 435
_CLONE_THREAD = 0x00010000
_CLONE_NAMESPACES = 0x7E020000  # NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET
_RET_ALLOW, _RET_ERRNO, _RET_KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
_LD_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06


def _seccomp_program(arch: str) -> list[tuple[int, int, int, int]]:
    """A classic-BPF filter: other architectures are killed, the denied calls get EPERM, clone3
    gets ENOSYS (glibc then uses clone, whose flags a filter can read), and clone must make a
    thread in this process's namespaces: no new processes."""
    col = 0 if arch == "x86_64" else 1
    denied = sorted({nums[col] for nums in _DENIED.values() if nums[col] is not None})
    prog: list[tuple] = [(_LD_ABS, 0, 0, 4), (_JEQ, 0, "kill", _AUDIT_ARCH[arch])]
    prog.append((_LD_ABS, 0, 0, 0))
    if arch == "x86_64":
        prog.append((_JGE, "deny", 0, 0x40000000))  # the x32 ABI
    prog += [(_JEQ, "deny", 0, nr) for nr in denied]
    prog += [(_JEQ, "enosys", 0, _CLONE3), (_JEQ, 0, "allow", _CLONE[arch])]
    prog += [(_LD_ABS, 0, 0, 16), (_JSET, 0, "deny", _CLONE_THREAD)]
    prog += [(_JSET, "deny", "allow", _CLONE_NAMESPACES)]
    labels = {"allow": len(prog), "deny": len(prog) + 1, "enosys": len(prog) + 2}
    labels["kill"] = len(prog) + 3
    prog += [
        (_RET, 0, 0, _RET_ALLOW),
        (_RET, 0, 0, _RET_ERRNO | errno.EPERM),
        (_RET, 0, 0, _RET_ERRNO | errno.ENOSYS),
        (_RET, 0, 0, _RET_KILL_PROCESS),
    ]
    out = []
    for i, (code, jt, jf, k) in enumerate(prog):
        jt = labels[jt] - i - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - i - 1 if isinstance(jf, str) else jf
        out.append((code, jt, jf, k))
    return out


def _seccomp() -> dict[str, object]:
    arch = platform.machine()
    if arch not in _AUDIT_ARCH:
        return layer(False, f"missing: no syscall table for {arch}")
    prog = _seccomp_program(arch)
    raw = b"".join(struct.pack("=HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw, len(raw))
    fprog = struct.pack("@HP", len(prog), ctypes.addressof(buf))  # struct sock_fprog
    fbuf = ctypes.create_string_buffer(fprog, len(fprog))
    ulong = ctypes.c_ulong
    if _libc.prctl(_PR_SET_SECCOMP, ulong(_SECCOMP_MODE_FILTER), fbuf, ulong(0), ulong(0)) != 0:
        return layer(False, f"missing: prctl(PR_SET_SECCOMP) refused: {_errno_text()}")
    try:
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close()
    except PermissionError:
        return layer(
            True,
            f"filter of {len(prog)} instructions: no new processes, sockets, exec, namespaces, "
            f"mounts, ptrace, bpf, kernel administration ({len(_DENIED)} calls refused)",
        )
    return layer(False, "missing: filter installed, yet a socket could still be created")


# ---- capabilities -----------------------------------------------------------------------
def _drop_capabilities() -> dict[str, object]:
    for cap in range(64):  # the bounding set first, so no exec can give any back
        if _prctl(_PR_CAPBSET_DROP, cap) != 0 and ctypes.get_errno() == errno.EINVAL:
            break
    header = struct.pack("=Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = ctypes.create_string_buffer(24)  # two empty cap_user_data_t: no capability at all
    if _libc.capset(header, data) != 0:
        return layer(False, f"missing: capset refused: {_errno_text()}")
    got = ctypes.create_string_buffer(24)
    if _libc.capget(header, got) != 0 or any(got.raw):
        return layer(False, "missing: capabilities remain after capset")
    return layer(True, "none effective, permitted, inheritable or in the bounding set")


def confine(
    data: Iterable[str], read_dirs: Iterable[str], write_dirs: Iterable[str]
) -> dict[str, dict[str, object]]:
    """Apply no_new_privs, Landlock, seccomp and the capability drop to this thread and every
    thread it starts later, each probed; returns their report entries. Landlock lets it read the
    files `data` names (a file, or the files in a folder, but not list it), read and list
    `read_dirs`, and write in `write_dirs`."""
    out: dict[str, dict[str, object]] = {}
    early = threads_now() - 1
    if _prctl(_PR_SET_NO_NEW_PRIVS, 1) == 0 and _prctl(_PR_GET_NO_NEW_PRIVS) == 1:
        out["no_new_privs"] = layer(True, "set: no exec can gain privileges")
    else:
        out["no_new_privs"] = layer(False, f"missing: prctl refused: {_errno_text()}")
    out["landlock"] = _landlock(list(data), list(read_dirs), list(write_dirs))
    out["seccomp"] = _seccomp()
    out["capabilities"] = _drop_capabilities()
    if early:
        for name in ("landlock", "seccomp"):
            if out[name]["in_force"]:
                threads = f"{early} thread{'s' if early > 1 else ''}"
                out[name] = layer(False, f"partial: {threads} started before it not bound")
    return out
