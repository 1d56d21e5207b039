"""The one Dask client helper (collection.cluster): what it starts listens on 127.0.0.1 only, it
gives the caller its environment back (after an error or Ctrl-C too), it runs one task per
item, and a job given `--scheduler` runs on that cluster instead."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from urllib.parse import urlsplit

import dask
import numpy as np
import psutil
import pytest
from distributed import Client, LocalCluster

from collection import schema as S
from collection.cluster import (
    LOOPBACK,
    QUIET_CLUSTER,
    each_completed,
    open_cluster,
    quiet_cluster_config,
)
from collection.parts import read_metadata

VAR = "SIEVE_TEST_WORKER_VAR"


def _listening(procs: list[psutil.Process]) -> set[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket of these processes."""
    out = set()
    for p in procs:
        for c in p.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN:
                out.add((p.pid, c.laddr.ip, c.laddr.port))
    return out


def _wait(check, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


@pytest.mark.parametrize("processes", [True, False])
def test_a_local_cluster_listens_on_loopback_only(processes):
    me = psutil.Process()
    before = _listening([me])
    with open_cluster(workers=1, processes=processes) as cluster:
        link = urlsplit(cluster.dashboard_link)
        assert link.hostname == LOOPBACK and link.port
        scheduler = cluster.cluster.scheduler
        http = {s.getsockname()[0] for s in scheduler.http_server._sockets.values()}
        assert http == {LOOPBACK}
        addresses = [scheduler.address, *cluster.client.scheduler_info()["workers"]]
        if processes:
            assert all(a.startswith(f"tcp://{LOOPBACK}:") for a in addresses), addresses
        else:  # threads of this process: no socket at all but the dashboard's
            assert all(a.startswith("inproc://") for a in addresses), addresses
        opened = _listening([me, *me.children(recursive=True)]) - before
        assert opened and {ip for _, ip, _ in opened} == {LOOPBACK}, opened
        assert link.port in {port for _, _, port in opened}
    assert _listening([me]) - before == set()


def test_workers_get_their_env_and_the_caller_gets_its_own_back(monkeypatch):
    monkeypatch.delenv(VAR, raising=False)
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)  # the nanny sets one in this process
    with open_cluster(workers=1, worker_env={VAR: "worker"}) as cluster:
        seen = cluster.client.run(lambda: os.environ.get(VAR))
        assert set(seen.values()) == {"worker"}
    assert VAR not in os.environ and "PYTHONHASHSEED" not in os.environ
    monkeypatch.setenv(VAR, "mine")  # a value the caller set wins, in the workers too
    with open_cluster(workers=1, worker_env={VAR: "worker"}) as cluster:
        assert set(cluster.client.run(lambda: os.environ.get(VAR)).values()) == {"mine"}
    assert os.environ[VAR] == "mine"


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_error_or_ctrl_c_closes_everything_and_restores_the_env(monkeypatch, error):
    monkeypatch.delenv(VAR, raising=False)
    with pytest.raises(error):
        with open_cluster(workers=1, worker_env={VAR: "worker"}) as cluster:
            assert cluster.client.run(lambda: os.environ.get(VAR))
            raise error("stop")
    assert cluster.client.status == "closed"
    assert cluster.cluster.status.name == "closed"
    assert VAR not in os.environ


def test_workers_run_quiet_unless_the_environment_says_otherwise(monkeypatch):
    """The LocalCluster's workers get QUIET_CLUSTER; a DASK_... variable the user set wins."""
    monkeypatch.setenv("DASK_DISTRIBUTED__WORKER__MEMORY__MONITOR_INTERVAL", "250ms")
    dask.config.refresh()  # as if set before this process started (Dask reads the environment once)
    try:
        chosen = quiet_cluster_config()
        assert "distributed.worker.memory.monitor-interval" not in chosen
        assert chosen["distributed.worker.profile.enabled"] is False
        with open_cluster(workers=1) as cluster:
            keys = list(QUIET_CLUSTER)
            seen = list(cluster.client.run(lambda: [dask.config.get(k) for k in keys]).values())
        assert dict(zip(keys, seen[0])) == {
            **QUIET_CLUSTER,
            "distributed.worker.memory.monitor-interval": "250ms",
        }
    finally:
        monkeypatch.delenv("DASK_DISTRIBUTED__WORKER__MEMORY__MONITOR_INTERVAL")
        dask.config.refresh()


def _square(x: int) -> int:
    if x == 3:
        raise ValueError("three")
    return x * x


GATE = threading.Event()


def _blocked(x: int) -> int:
    if x:
        GATE.wait(60)
    return x


def test_each_completed_yields_every_task_once_and_cancels_the_rest_when_stopped():
    with open_cluster(workers=1, threads_per_worker=2, processes=False) as cluster:
        outcomes = list(each_completed(cluster.client, _square, [(x,) for x in range(6)], "sq"))
        assert sorted(o.index for o in outcomes) == list(range(6))
        by_index = {o.index: o for o in outcomes}
        assert [by_index[i].value for i in (0, 1, 2, 4, 5)] == [0, 1, 4, 16, 25]
        assert isinstance(by_index[3].error, ValueError) and by_index[3].value is None
        # a caller that stops at the first result leaves nothing queued on the cluster
        GATE.clear()
        it = each_completed(cluster.client, _blocked, [(x,) for x in range(5)], "blocked")
        first = next(it)
        assert first.index == 0
        it.close()
        GATE.set()
        scheduler = cluster.cluster.scheduler
        assert _wait(lambda: not any(k.startswith("blocked") for k in scheduler.tasks))


def test_a_scheduler_address_is_used_and_left_running():
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=False,
            protocol="tcp://",
            host=LOOPBACK,
            dashboard_address=None,
        ) as external,
        Client(external) as watcher,
    ):
        with open_cluster(external.scheduler_address) as cluster:
            assert cluster.cluster is None
            outcomes = list(each_completed(cluster.client, _square, [(2,), (4,)], "ext"))
            assert sorted(o.value for o in outcomes) == [4, 16]
        assert cluster.client.status == "closed"
        assert watcher.submit(_square, 5).result() == 25  # the user's cluster still runs


def test_embed_runs_on_the_cluster_given_by_scheduler(tiny_clip, tmp_path):
    """`--scheduler tcp://...`: an external LocalCluster's address gives the same collection."""
    from pipelines.embed import embed
    from pipelines.generate import write_sample_dataset

    shards = tmp_path / "shards"
    write_sample_dataset(shards, 24, size=32, shard_size=12)
    local = str(tmp_path / "local")
    embed(str(shards), local, workers=1, threads_per_worker=1, batch_size=8)
    with LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=False,
        protocol="tcp://",
        host=LOOPBACK,
        dashboard_address=None,
    ) as external:
        remote = str(tmp_path / "remote")
        summary = embed(
            str(shards), remote, scheduler=external.scheduler_address, batch_size=8, workers=1
        )
        assert summary["parts"] == 2 and summary["failed_shards"] == {}
    # the external cluster's worker is a thread of this process; a LocalCluster of embed's own
    # would have run the parts in a child process
    done = (tmp_path / "remote" / S.DONE_DIR).glob("*.json")
    here = f"{socket.gethostname()}:{os.getpid()}"
    assert {json.loads(p.read_text())["worker"] for p in done} == {here}
    a, b = read_metadata(local), read_metadata(remote)
    assert a.column(S.KEY).to_pylist() == b.column(S.KEY).to_pylist()
    np.testing.assert_allclose(
        a.column(S.CLIP_SIMILARITY).to_numpy(), b.column(S.CLIP_SIMILARITY).to_numpy(), atol=2e-3
    )
