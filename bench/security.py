"""`python -m bench.security [--work DIR] [--second-user-seconds S]` → results/security.json.

Tries every attack on a collection it builds itself (as the tests' demo collection: 300
generated samples embedded with sieve-tiny and indexed, one key taken down) through what a
team's UI runs, `Catalog(untrusted=True)` with its defaults: the SQL attacks of
`bench.security_attacks` (files, network, extensions, settings, statements, resource
exhaustion, type edge cases) and the web ones of `bench.security_web.web_attacks` (takedown
bypass, UI paths, server bodies, UI type rendering). Records `tried`, `held` and `by_category`
(goal: every one held), each attack's outcome, the sandbox layers in force, and
`second_user_p99_ms`: the latency of a trivial query from a second client while a first keeps
hostile queries running (goal ≤ 1,000 ms), next to the same query's latency on idle workers.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from bench.common import write_results
from bench.security_attacks import ATTACKER, HOSTILE_SQL, Probe, sql_attacks
from bench.security_web import web_attacks
from collection import schema as S, takedown
from collection.parts import read_metadata
from curation.catalog import Catalog, SqlError
from models.runtime import setup_logging

log = logging.getLogger("bench.security")

Attack = tuple[str, str, Callable[[], tuple[bool, str]]]
#: what the second user runs, and how often
TRIVIAL_SQL, PAUSE_S = "SELECT 1 AS one", 0.05


def build_collection(work: Path, n: int = 300) -> str:
    """The demo-like collection the attacks run on (built once per --work folder)."""
    coll = work / "collection"
    layout = S.CollectionLayout(str(coll))
    if os.path.exists(layout.takedown):
        return str(coll)
    # the embed job and the index builder (torch, Dask, FAISS): only a fresh collection needs them
    from indices.build import build
    from pipelines.embed import embed
    from pipelines.generate import write_sample_dataset

    shutil.rmtree(work, ignore_errors=True)
    shards = work / "shards"
    write_sample_dataset(shards, n, shard_size=n, corrupt_fraction=0.02)
    embed(str(shards), str(coll), workers=1, scores="watermark,toxicity")
    build(str(coll), max_index_memory="100M")
    key = read_metadata(str(coll)).column(S.KEY)[0].as_py()
    takedown.add(str(coll), keys=[key], reason="bench.security")
    return str(coll)


def run_attacks(attacks: list[Attack]) -> list[dict[str, Any]]:
    """Each attack's category, name, held and detail (an attack that raises is not held)."""
    out = []
    for i, (category, name, attack) in enumerate(attacks):
        start = time.perf_counter()
        try:
            held, detail = attack()
        except Exception as exc:  # a broken attack is reported as not held, not fatal
            held, detail = False, f"the attack itself failed: {type(exc).__name__}: {exc}"
        seconds = round(time.perf_counter() - start, 3)
        out.append(
            {"category": category, "name": name, "held": bool(held), "detail": detail, "s": seconds}
        )
        log.info(
            "%3d/%d %s / %s: %s", i + 1, len(attacks), category, name, "held" if held else detail
        )
    return out


def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """{"tried", "held", "held_fraction", "by_category": {category: {"tried", "held"}}}."""
    by: dict[str, dict[str, int]] = {}
    for r in results:
        c = by.setdefault(r["category"], {"tried": 0, "held": 0})
        c["tried"] += 1
        c["held"] += int(r["held"])
    held = sum(r["held"] for r in results)
    return {
        "tried": len(results),
        "held": held,
        "held_fraction": held / max(1, len(results)),
        "by_category": by,
    }


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _latencies(cat: Catalog, seconds: float, client: str) -> list[float]:
    out, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        cat.query(TRIVIAL_SQL, client=client)
        out.append((time.perf_counter() - start) * 1000)
        time.sleep(PAUSE_S)
    return out


def second_user(
    cat: Catalog, seconds: float, hostile: str = HOSTILE_SQL, attackers: int = 2
) -> dict[str, Any]:
    """A trivial query's latency from one client while another runs `hostile` queries back to
    back from `attackers` threads (each until the time limit stops it), and on idle workers."""
    idle = _latencies(cat, min(seconds, 5.0), "second user")
    stop, ran = threading.Event(), [0]

    def attack() -> None:
        while not stop.is_set():
            try:
                cat.query(hostile, client=ATTACKER)
            except SqlError:
                pass  # the time limit: what the attacker gets, and it tries again
            ran[0] += 1

    threads = [threading.Thread(target=attack, daemon=True) for _ in range(attackers)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # the attacker's first query is running
    busy = _latencies(cat, seconds, "second user")
    stop.set()
    for t in threads:
        t.join()
    return {
        "second_user_p99_ms": round(_percentile(busy, 99), 2),
        "second_user": {
            "query": TRIVIAL_SQL,
            "queries": len(busy),
            "p50_ms": round(_percentile(busy, 50), 2),
            "p99_ms": round(_percentile(busy, 99), 2),
            "max_ms": round(max(busy), 2),
            "idle_p50_ms": round(_percentile(idle, 50), 2),
            "idle_p99_ms": round(_percentile(idle, 99), 2),
            "hostile_query": hostile,
            "hostile_threads": attackers,
            "hostile_queries_run": ran[0],
            "seconds": seconds,
        },
    }


def run(work: Path, seconds: float) -> dict[str, Any]:
    """Build (or reuse) the collection, try every attack, measure the second user."""
    coll = build_collection(work)
    rundir = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    here = os.getcwd()
    os.chdir(rundir)  # workers used to inherit the caller's cwd: its .tmp/ holds a canary
    try:
        with Catalog(coll, untrusted=True) as cat:
            probe = Probe(cat, coll, rundir)
            try:
                attacks = sql_attacks(probe) + web_attacks(coll, rundir)
                results = run_attacks(attacks)
            finally:
                probe.close()
            pool = cat.sandbox
            assert pool is not None
            payload: dict[str, Any] = {
                **summary(results),
                "sandbox_layers": cat.sandbox_layers,
                "layers_in_force": sorted(
                    k for k, v in cat.sandbox_layers.items() if v["in_force"]
                ),
                **second_user(cat, seconds),
                "failed": [r for r in results if not r["held"]],
                "attacks": results,
                "catalog": {
                    "workers": len(pool.workers),
                    "threads_per_worker": pool.limits.threads,
                    "timeout_s": pool.limits.timeout_s,
                    "memory_limit": pool.limits.memory_limit,
                    "row_cap": cat.row_cap,
                },
                "kernel": platform.release(),
            }
    finally:
        os.chdir(here)
        shutil.rmtree(rundir, ignore_errors=True)
    return payload


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.security",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--work",
        default=os.path.join(tempfile.gettempdir(), "sieve-bench-security"),
        help="the generated collection (reused across runs) and each run's canaries",
    )
    p.add_argument(
        "--second-user-seconds",
        type=float,
        default=20.0,
        help="how long the second user queries while the first runs hostile queries",
    )
    a = p.parse_args(argv)
    setup_logging()
    payload = run(Path(a.work).resolve(), a.second_user_seconds)
    path = write_results("security", payload)
    print(
        f"{payload['held']}/{payload['tried']} attacks held; layers in force: "
        f"{', '.join(payload['layers_in_force'])}; second user p99 "
        f"{payload['second_user_p99_ms']} ms → {path}"
    )


if __name__ == "__main__":
    main()
