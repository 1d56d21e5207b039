"""The untrusted-SQL sandbox as a hostile user meets it: every SQL attack of bench.security is
held, the OS layers are in force where the kernel has them (and enforce without DuckDB's help),
legal values never kill a worker, and one user's hostile query never stalls another's."""

from __future__ import annotations

import json
import os
import platform
import signal
import socketserver
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bench.security_attacks import ATTACKER, HOSTILE_SQL, SQL_ATTACKS, Probe
from bench.synthetic import clustered_vectors, write_collection
from collection import schema as S, takedown
from collection.parts import read_metadata
from collection.sandbox import Limits, Sandbox, SqlError
from collection.sandbox_os import LAYERS, landlock_abi
from curation.catalog import Catalog

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 1.0
N = (40, 25)


@pytest.fixture(scope="module")
def coll(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("sandbox") / "c")
    write_collection(root, [clustered_vectors(k, 8, 4, seed=i) for i, k in enumerate(N)])
    takedown.add(root, keys=read_metadata(root).column(S.KEY).to_pylist()[:1], reason="test")
    return root


@pytest.fixture(scope="module")
def probe(coll, tmp_path_factory):
    """An untrusted catalog started from a folder whose .tmp/ holds a canary (workers used to
    inherit their caller's cwd, and DuckDB allows its default temp dir `.tmp/`), and its Probe."""
    workdir = tmp_path_factory.mktemp("attacks")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        with Catalog(
            coll, untrusted=True, row_cap=50, timeout_s=TIMEOUT, memory_limit="256MB"
        ) as cat:
            p = Probe(cat, coll, workdir)
            yield p
            p.close()


@pytest.mark.parametrize(
    "attack", SQL_ATTACKS, ids=[f"{a.category}: {a.name}" for a in SQL_ATTACKS]
)
def test_each_sql_attack_is_held(probe, attack):
    held, detail = probe.run(attack)
    assert held, detail


def test_the_attack_list_covers_every_sql_category():
    counts: dict[str, int] = {}
    for a in SQL_ATTACKS:
        counts[a.category] = counts.get(a.category, 0) + 1
    assert set(counts) == {
        "files",
        "network",
        "extensions",
        "settings",
        "statements",
        "resource exhaustion",
        "type edge cases",
    }
    assert min(counts.values()) >= 10 and len({(a.category, a.name) for a in SQL_ATTACKS}) == len(
        SQL_ATTACKS
    )


# ---- the OS layers --------------------------------------------------------------------------
def _unshare_refused(flags: int) -> str | None:
    """Why this kernel refuses unshare(flags) to a fresh process (None: it allows it)."""
    code = f"import ctypes, os; os._exit(0 if ctypes.CDLL(None).unshare({flags}) == 0 else 1)"
    done = subprocess.run([sys.executable, "-c", code], timeout=60)
    return None if done.returncode == 0 else f"unshare({flags:#x}) is refused here"


def _kernel_refuses(layer: str) -> str | None:
    """An independent look at whether the kernel offers a layer (None: it does)."""
    if sys.platform != "linux":
        return "not Linux"
    if layer == "user_namespace":
        return _unshare_refused(0x10000000)
    if layer == "network":
        return _unshare_refused(0x10000000 | 0x40000000) and _unshare_refused(0x40000000)
    if layer == "landlock":
        return None if landlock_abi() >= 1 else "the kernel has no Landlock"
    if layer == "seccomp":
        status = Path("/proc/self/status").read_text()
        if "Seccomp:" not in status or platform.machine() not in ("x86_64", "aarch64"):
            return "no seccomp filter support for this kernel or architecture"
    return None


@pytest.mark.parametrize("layer", LAYERS)
def test_each_layer_the_kernel_offers_is_in_force(probe, layer):
    reason = _kernel_refuses(layer)
    layers = probe.catalog.sandbox_layers
    if reason:
        assert not layers[layer]["in_force"] and layers[layer]["detail"].startswith("missing")
        pytest.skip(reason)
    assert layers[layer]["in_force"], layers[layer]["detail"]


_CONFINED = """
import errno, json, os, socket, sys, threading
from collection.sandbox_os import confine, enter_namespaces, runtime_dirs
if sys.argv[1] == "threaded":
    threading.Thread(target=threading.Event().wait, daemon=True).start()
layers = enter_namespaces()

def attempt(fn):
    try:
        fn()
        return "allowed"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))

def fork():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)

def connect():
    with socket.create_connection(("127.0.0.1", int(sys.argv[4])), timeout=2):
        pass


in_namespace = attempt(connect)  # before seccomp, which refuses the socket itself
layers.update(confine([os.path.dirname(sys.argv[2])], runtime_dirs(), [sys.argv[3]]))
out = {
    "layers": layers,
    "connect in the namespace": in_namespace,
    "read data": attempt(lambda: open(sys.argv[2]).read()),
    "read elsewhere": attempt(lambda: open("/etc/passwd").read()),
    "list the data folder": attempt(lambda: os.listdir(os.path.dirname(sys.argv[2]))),
    "write temp": attempt(lambda: open(os.path.join(sys.argv[3], "x"), "w").write("x")),
    "write elsewhere": attempt(lambda: open(sys.argv[2] + ".w", "w").write("x")),
    "connect": attempt(connect),
    "fork": attempt(fork),
    # exec only where seccomp should refuse it: a successful one would replace this script
    "exec": attempt(lambda: os.execv("/bin/true", ["true"]))
    if layers["seccomp"]["in_force"]
    else "not tried",
    "signal the parent": attempt(lambda: os.kill(os.getppid(), 0)),
}
print(json.dumps(out))
"""


def _confined(tmp_path: Path, mode: str = "plain") -> dict:
    data, temp = tmp_path / "data" / "part.parquet", tmp_path / "temp"
    data.parent.mkdir()
    data.write_text("data\n")
    temp.mkdir()
    with socketserver.TCPServer(("127.0.0.1", 0), socketserver.BaseRequestHandler) as server:
        port = server.server_address[1]
        done = subprocess.run(
            [sys.executable, "-c", _CONFINED, mode, str(data), str(temp), str(port)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_confined_process_reads_its_data_and_nothing_else_even_without_duckdb(tmp_path):
    """The OS layers on their own, with no DuckDB setting in the way: what a query that
    escaped DuckDB's lock could still do."""
    out = _confined(tmp_path)
    layers = out["layers"]
    assert out["read data"] == "allowed" and out["write temp"] == "allowed"
    if layers["landlock"]["in_force"]:
        assert out["read elsewhere"] == "EACCES" and out["write elsewhere"] == "EACCES"
        assert out["list the data folder"] == "EACCES"
    if layers["network"]["in_force"]:
        assert out["connect in the namespace"] == "ENETUNREACH"
    assert out["connect"] != "allowed" or not any(
        layers[name]["in_force"] for name in ("network", "landlock", "seccomp")
    )
    if layers["seccomp"]["in_force"]:
        assert out["fork"] == "EPERM" and out["exec"] == "EPERM"
    if layers["landlock"]["in_force"] and landlock_abi() >= 6:
        assert out["signal the parent"] == "EPERM"
    if not all(v["in_force"] for v in layers.values()):
        pytest.skip(f"some layers are missing here: {layers}")


def test_a_layer_the_process_cannot_take_is_reported_missing_and_the_rest_still_apply(tmp_path):
    """A thread started first: namespaces need a single-threaded process, Landlock and seccomp
    would not bind that thread; each says so, no_new_privs and the capability drop still hold."""
    layers = _confined(tmp_path, "threaded")["layers"]
    assert set(layers) == set(LAYERS)
    for name in ("user_namespace", "network"):
        assert not layers[name]["in_force"] and "thread" in layers[name]["detail"]
    for name in ("landlock", "seccomp"):
        assert not layers[name]["in_force"] and "thread" in layers[name]["detail"]
    assert layers["no_new_privs"]["in_force"] and layers["capabilities"]["in_force"]


def test_check_sandbox_prints_every_layer_and_exits_0():
    done = subprocess.run(
        [sys.executable, "-m", "curation.sql", "--check-sandbox"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for name in LAYERS:
        assert any(line.startswith(name + " ") for line in lines), done.stdout
    assert lines[-1].endswith("layers in force")


# ---- workers that live, in an empty folder, with few threads --------------------------------
def test_legal_values_come_back_and_the_worker_lives(probe):
    cat = probe.catalog
    pids = cat.sandbox.pids
    row = cat.query(
        "SELECT TIME '24:00:00' AS t, 170141183460469231731687303715884105727::HUGEINT AS h, "
        "340282366920938463463374607431768211455::UHUGEINT AS u, 1 AS n"
    ).table.to_pylist()
    assert row == [
        {
            "t": "24:00:00",
            "h": "170141183460469231731687303715884105727",
            "u": "340282366920938463463374607431768211455",
            "n": 1,
        }
    ]
    with pytest.raises(SqlError, match="boom"):
        cat.query("SELECT CASE WHEN range > 5000 THEN error('boom') END FROM range(10000)")
    assert cat.query("SELECT sum(width) AS s FROM samples").table.column(0)[0].as_py() > 0
    assert cat.sandbox.pids == pids and cat.sandbox.restarts == 0


def test_workers_run_in_their_own_empty_folder_with_bounded_threads(probe):
    cat = probe.catalog
    temps = set()
    for worker in cat.sandbox.workers:
        row = worker.query(
            "SELECT current_setting('temp_directory') AS temp, current_setting('threads') AS n", 1
        )[0].to_pylist()[0]
        assert 1 <= int(row["n"]) <= 2
        temps.add(row["temp"])
        assert Path(row["temp"]).parent.name.startswith("sieve-")
        assert not Path(row["temp"]).is_relative_to(Path.cwd())
        assert os.readlink(f"/proc/{worker.pid}/cwd") == str(Path(row["temp"]).parent)
    assert len(temps) == len(cat.sandbox.workers)


def test_a_relative_collection_path_is_read_from_the_callers_folder(coll, monkeypatch):
    """The worker runs in a folder of its own; the caller's relative path still names the data."""
    monkeypatch.chdir(Path(coll).parent)
    with Catalog(Path(coll).name, untrusted=True, workers=1) as cat:
        assert cat.count() == sum(N) - 1  # one key is taken down


def test_a_worker_left_running_at_exit_is_stopped_and_its_folder_removed(tmp_path):
    """A caller that never closes its sandbox and holds it where no finaliser runs at exit (a
    UI's cached resource, here a daemon thread)."""
    code = (
        "import threading\n"
        "from collection.sandbox import Sandbox\n"
        "def hold(box):\n"
        "    threading.Event().wait()\n"
        "box = Sandbox(label='left').start()\n"
        "print(box.pid)\n"
        "threading.Thread(target=hold, args=(box,), daemon=True).start()\n"
        "del box\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr
    assert not list(tmp_path.glob("sieve-left-*"))
    assert not Path(f"/proc/{int(done.stdout)}").exists()


def test_restarts_back_off_when_workers_keep_dying():
    with Sandbox(limits=Limits(timeout_s=30, memory_limit="256MB", threads=1)) as box:
        for _ in range(2):
            box.start()
            threading.Timer(0.3, os.kill, (box.pid, signal.SIGKILL)).start()
            with pytest.raises(SqlError, match="died.*SIGKILL"):
                box.query(HOSTILE_SQL)
        # the second failure in a row: no new worker until the pause is over
        assert box.pid is None and box.available_at() > 0
        assert box.query("SELECT 42 AS x")[0].to_pylist() == [{"x": 42}]
        assert box.restarts == 2


# ---- two users at once -----------------------------------------------------------------------
def test_a_second_user_is_answered_while_the_first_runs_hostile_queries(coll):
    """The first user's two hostile queries (each would run for minutes) hold at most one of the
    two workers; the second user's query finishes before either of them does."""
    finished: list[str] = []
    lock = threading.Lock()
    with Catalog(coll, untrusted=True, timeout_s=300, memory_limit="256MB") as cat:
        cat.start()
        pool = cat.sandbox

        def hostile() -> None:
            try:
                cat.query(HOSTILE_SQL, client=ATTACKER)
            except SqlError:
                pass  # its worker is killed below
            with lock:
                finished.append("hostile")

        threads = [threading.Thread(target=hostile) for _ in range(2)]
        for t in threads:
            t.start()
        while not pool.running().get(ATTACKER):
            threading.Event().wait(0.01)
        answer = cat.query("SELECT 1 AS one", client="second user").table.to_pylist()
        with lock:
            finished.append("second user")
        assert answer == [{"one": 1}]
        assert len(pool.running()[ATTACKER]) == 1  # never both workers
        _kill_until_done(pool, ATTACKER, threads)
    assert finished[0] == "second user" and finished.count("hostile") == 2


def _kill_until_done(pool, client: str, threads: list[threading.Thread]) -> None:
    """End a client's queries now rather than at their time limit: kill the workers it runs on
    until its threads are done."""
    while any(t.is_alive() for t in threads):
        for index in pool.running().get(client, []):
            pid = pool.workers[index].pid
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
        threading.Event().wait(0.05)


def test_the_queue_serves_clients_in_turn():
    """Three queries of one client wait; a second client's query, queued last, runs second."""
    from collection.sandbox_pool import SandboxPool

    order: list[str] = []
    lock = threading.Lock()
    with SandboxPool(limits=Limits(timeout_s=30, threads=1), workers=2) as pool:
        pool.start()
        gate = threading.Event()

        def run(client: str, sql: str) -> None:
            try:
                pool.query(sql, client=client)
            except SqlError:
                pass  # the blocker: its worker is killed below
            with lock:
                order.append(client)

        blocker = threading.Thread(target=run, args=("a", HOSTILE_SQL))
        blocker.start()
        while not pool.running().get("a"):
            gate.wait(0.01)
        waiting = [threading.Thread(target=run, args=("a", "SELECT 1")) for _ in range(3)]
        for t in waiting:
            t.start()
        while pool.waiting().get("a", 0) < 3:
            gate.wait(0.01)
        run("b", "SELECT 2")
        assert order == ["b"]  # served while client a's three still wait behind its first
        _kill_until_done(pool, "a", [blocker])
        for t in waiting:
            t.join(120)
    assert order[0] == "b" and order.count("a") == 4
