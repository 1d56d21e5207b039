"""curation.catalog and collection.sandbox: `samples` over the parts, the trusted command, and
untrusted SQL that is refused or stopped while the caller's process carries on."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bench.synthetic import clustered_vectors, write_collection
from collection import schema as S, takedown
from collection.parts import read_metadata
from curation.catalog import Catalog, CollectionError, SqlError

REPO = Path(__file__).resolve().parent.parent
N = (40, 25)  # ok rows per part
FAILED = 3  # failed rows per part
TIMEOUT = 2.0


@pytest.fixture(scope="module")
def coll(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("sql") / "c")
    n = sum(N)
    write_collection(
        root,
        [clustered_vectors(k, 8, 4, seed=i) for i, k in enumerate(N)],
        failed_per_part=FAILED,
        columns={
            S.LANGUAGE: ["en", "de", "und"] * (n // 3) + ["en"] * (n % 3),
            "shape": ["circle", "star"] * (n // 2) + ["circle"] * (n % 2),
        },
    )
    return root


@pytest.fixture(scope="module")
def untrusted(coll):
    with Catalog(coll, untrusted=True, row_cap=50, timeout_s=TIMEOUT, memory_limit="256MB") as cat:
        yield cat


def test_samples_holds_every_part_every_column_and_the_global_id(coll):
    with Catalog(coll) as cat:
        assert set(S.METADATA_COLUMNS) | {"shape", S.ID} <= set(cat.columns)
        rows = cat.query(
            "SELECT key, part, id, status FROM samples ORDER BY part, row"
        ).table.to_pylist()
    assert len(rows) == sum(N) + 2 * FAILED
    assert all((r["id"] is None) == (r["status"] != S.STATUS_OK) for r in rows)
    ok = sorted((r for r in rows if r["id"] is not None), key=lambda r: r["id"])
    # the same numbering as the indices': position among ok rows, parts in order
    assert [r["key"] for r in ok] == read_metadata(coll).column(S.KEY).to_pylist()
    assert [r["id"] for r in ok] == list(range(sum(N)))


def test_trusted_has_no_row_cap_unless_asked(coll):
    with Catalog(coll, row_cap=5) as cat:
        assert cat.query("SELECT * FROM samples").table.num_rows == sum(N) + 2 * FAILED
        capped = cat.query("SELECT * FROM samples", row_cap=10)
        assert capped.table.num_rows == 10 and capped.truncated
        assert cat.count("language = 'de'") == 21


def test_sql_command_writes_each_format(coll, tmp_path, capsys):
    from curation.sql import sql

    q = "SELECT language, count(*) AS n FROM samples WHERE status = 'ok' GROUP BY 1 ORDER BY 1"
    want = {"de": 21, "en": 23, "und": 21}
    sql(coll, q, "csv", str(tmp_path / "r.csv"))
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert lines[0] == '"language","n"' and len(lines) == 4
    sql(coll, q, "json", str(tmp_path / "r.json"))
    assert {r["language"]: r["n"] for r in json.loads((tmp_path / "r.json").read_text())} == want
    sql(coll, q, "parquet", str(tmp_path / "r.parquet"))
    assert dict(zip(*pq.read_table(tmp_path / "r.parquet").to_pydict().values())) == want
    capsys.readouterr()
    sql(coll, q, "table")
    out = capsys.readouterr().out
    assert "language" in out and "(3 rows)" in out
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


@pytest.mark.parametrize(
    "args,word",
    [
        (["SELECT no_such_column FROM samples"], "no_such_column"),
        (["SELECT 1", "--format", "parquet"], "--out"),
        (
            ["SELECT 1", "--out", "/proc/no/such/dir/r.csv", "--format", "csv"],
            "/proc/no/such/dir/r.csv",
        ),
    ],
)
def test_sql_command_bad_input_is_one_line_naming_the_thing(coll, args, word):
    done = subprocess.run(
        [sys.executable, "-m", "curation.sql", coll, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 2
    assert (
        done.stderr.startswith("error: ")
        and word in done.stderr
        and len(done.stderr.strip().splitlines()) == 1
    )


def test_a_missing_collection_is_named(tmp_path):
    with pytest.raises(CollectionError, match="nowhere"):
        Catalog(str(tmp_path / "nowhere"))


def test_untrusted_selects_and_aggregates_with_a_row_cap(untrusted):
    counted = untrusted.query("SELECT count(*) AS n, count(id) AS ids FROM samples")
    assert (
        counted.table.to_pylist() == [{"n": sum(N) + 2 * FAILED, "ids": sum(N)}]
        and not counted.truncated
    )
    capped = untrusted.query("SELECT * FROM samples")
    assert capped.table.num_rows == 50 and capped.truncated
    assert untrusted.query("SELECT key FROM samples", row_cap=7).table.num_rows == 7
    assert untrusted.query(
        "WITH t AS (SELECT part FROM samples) SELECT max(part) AS p FROM t"
    ).table.to_pylist() == [{"p": 1}]


ATTACKS = [
    ("SELECT * FROM read_csv('/etc/passwd')", "disabled"),
    ("SELECT * FROM read_text('/etc/passwd')", "disabled"),
    ("SELECT * FROM glob('/*')", "disabled"),
    ("SELECT * FROM 'http://example.com/x.parquet'", "disabled"),
    ("SELECT * FROM read_parquet('https://example.com/x.parquet')", "disabled"),
    ("COPY (SELECT * FROM samples) TO '/tmp/sieve-leak.csv'", "only SELECT"),
    ("EXPORT DATABASE '/tmp/sieve-leak'", "only SELECT"),
    ("ATTACH '/tmp/sieve-leak.db'", "only SELECT"),
    ("INSTALL httpfs", "only SELECT"),
    ("LOAD httpfs", "only SELECT"),
    ("SET threads = 64", "only SELECT"),
    ("RESET memory_limit", "only SELECT"),
    ("PRAGMA version", "only SELECT"),
    ("CREATE SECRET (TYPE s3, KEY_ID 'x', SECRET 'y')", "only SELECT"),
    ("CREATE TABLE t AS SELECT 1", "only SELECT"),
    ("SELECT 1; SELECT 2", "one statement"),
    ("SELECT 1; PRAGMA version", "one statement"),
    ("", "empty"),
]


@pytest.mark.parametrize("sql,word", ATTACKS, ids=[a[0][:40] for a in ATTACKS])
def test_each_attack_is_refused_and_the_catalog_keeps_answering(untrusted, sql, word):
    with pytest.raises(SqlError) as info:
        untrusted.query(sql)
    assert word.lower() in str(info.value).lower() and "\n" not in str(info.value)
    assert untrusted.count() == sum(N) + 2 * FAILED
    assert not Path("/tmp/sieve-leak.csv").exists() and not Path("/tmp/sieve-leak").exists()


def test_a_query_that_would_run_for_minutes_is_stopped(untrusted):
    start = time.monotonic()
    with pytest.raises(SqlError, match="time limit"):
        untrusted.query("SELECT sum(a.range * b.range) FROM range(1000000) a, range(1000000) b")
    assert (
        time.monotonic() - start < TIMEOUT + 30
    )  # the limit (plus the kill's grace on a loaded machine)
    assert untrusted.count("part = 0") == N[0] + FAILED


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT list(range(400000000)) AS l",
        "SELECT repeat('x', 3000000000) AS s",
        "SELECT string_agg(repeat('x', 1000), ',') FROM range(3000000)",
    ],
)
def test_a_query_that_would_allocate_gigabytes_is_refused(untrusted, sql):
    with pytest.raises(SqlError, match="memory|limit|died"):
        untrusted.query(sql)
    assert untrusted.count() == sum(N) + 2 * FAILED


def test_a_worker_that_dies_mid_query_is_replaced(untrusted):
    """What a query killed by its address-space cap looks like to the caller."""
    untrusted.start()
    pid = untrusted.worker_pid
    threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()
    with pytest.raises(SqlError, match="died"):
        untrusted.query("SELECT sum(a.range * b.range) FROM range(1000000) a, range(1000000) b")
    assert untrusted.count() == sum(N) + 2 * FAILED
    assert untrusted.worker_pid not in (None, pid)


def test_unknown_columns_and_bad_sql_are_one_line_errors(untrusted, coll):
    for cat in (untrusted, Catalog(coll)):
        with pytest.raises(SqlError, match="nope") as info:
            cat.query("SELECT nope FROM samples")
        assert "\n" not in str(info.value)
        with pytest.raises(SqlError):
            cat.query("SELEKT 1")


def test_taken_down_rows_are_invisible_to_untrusted_sql(coll, tmp_path):
    root = str(tmp_path / "c")
    shutil.copytree(coll, root)
    keys = read_metadata(root).column(S.KEY).to_pylist()
    takedown.add(root, keys=keys[:3], reason="test")
    with Catalog(root, untrusted=True, timeout_s=TIMEOUT) as cat, Catalog(root) as owner:
        listed = ", ".join(f"'{k}'" for k in keys[:6])
        assert cat.count(f"key IN ({listed})") == 3
        assert owner.count(f"key IN ({listed})") == 6  # the owner's own queries see everything
        # a change to the list while the catalog is open: hidden from the next query on
        takedown.add(root, keys=keys[3:5])
        time.sleep(1.2)
        assert cat.count(f"key IN ({listed})") == 1
        assert (
            cat.query("SELECT count(*) AS n FROM samples").table.column(0)[0].as_py()
            == sum(N) + 2 * FAILED - 5
        )


def test_id_column_of_older_collections_is_replaced(tmp_path):
    """A source field called `id` (before `id` was reserved) does not hide the global id."""
    root = str(tmp_path / "c")
    write_collection(
        root, [clustered_vectors(10, 8, 2)], columns={"id": [f"src{i}" for i in range(10)]}
    )
    with Catalog(root) as cat:
        assert cat.query("SELECT id FROM samples ORDER BY id").table.column(0).to_pylist() == list(
            range(10)
        )
