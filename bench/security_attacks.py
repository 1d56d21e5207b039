"""The SQL attacks `python -m bench.security` tries and the suite runs, with what each must do.

Each attack is one query a hostile user could type into the UI's query box, run through
`Catalog(untrusted=True)` and judged by a `Probe`: canary files (one in the worker's would-be
`.tmp/`, where DuckDB's default temp directory used to expose the caller's files), a loopback
HTTP server counting requests, a file path a write would create, the workers' settings and
loaded extensions, the row count of `samples` and the workers' process ids. An attack is held
when it got what its `expect` allows and none of those changed:
- REFUSED: a one-line SqlError;
- SURVIVES: rows that validate or a one-line SqlError, and no worker restarted (legal types);
- BOUNDED: a one-line SqlError or a result cut short, and the catalog answers afterwards.
"""

from __future__ import annotations

import http.server
import os
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from collection import schema as S
from curation.catalog import Catalog, SqlError
from curation.sql import printable

REFUSED, SURVIVES, BOUNDED = "refused", "survives", "bounded"
#: a client name of its own, so the checks between attacks queue apart from the attacks
ATTACKER, CHECKER = "attacker", "checker"
#: what every worker reports before and after each attack (any change is a breach)
SETTINGS_SQL = (
    "SELECT current_setting('enable_external_access') AS external, "
    "current_setting('lock_configuration') AS locked, current_setting('threads') AS threads, "
    "current_setting('memory_limit') AS memory, "
    "current_setting('max_temp_directory_size') AS temp_size, "
    "current_setting('autoload_known_extensions') AS autoload, "
    "current_setting('autoinstall_known_extensions') AS autoinstall, "
    "(SELECT count(*) FROM duckdb_functions()) AS functions, "  # an extension loaded adds some
    "(SELECT count(*) FROM duckdb_settings()) AS setting_names"
)


@dataclass(frozen=True)
class SqlAttack:
    """One hostile query: placeholders {canary} {canary_dir} {collection} {part} {takedown}
    {port} {leak} are filled by the Probe. `shows`: text an answer must hold (the value
    itself, not a wrong one)."""

    category: str
    name: str
    sql: str
    expect: str = REFUSED
    shows: str = ""


def _attacks(category: str, expect: str, items: list[tuple]) -> list[SqlAttack]:
    return [SqlAttack(category, *item[:2], expect, *item[2:]) for item in items]


_DEEP = "SELECT " + "(" * 3000 + "1" + ")" * 3000 + " AS deep"
_LONG = "SELECT " + "1+" * 500_000 + "1 AS long_text"
_WIDE = "SELECT " + ", ".join(f"range AS c{i}" for i in range(3000)) + " FROM range(100000)"
#: a query that would run for minutes: the benchmark's hostile user runs it back to back
HOSTILE_SQL = "SELECT sum(a.range * b.range) AS s FROM range(1000000) a, range(1000000) b"

SQL_ATTACKS: list[SqlAttack] = [
    *_attacks(
        "files",
        REFUSED,
        [
            ("read_text /etc/passwd", "SELECT * FROM read_text('/etc/passwd')"),
            ("read_csv /etc/passwd", "SELECT * FROM read_csv('/etc/passwd')"),
            ("read_csv list", "SELECT * FROM read_csv(['/etc/passwd', '/etc/group'])"),
            ("read_blob /etc/hostname", "SELECT * FROM read_blob('/etc/hostname')"),
            ("read_json /etc/hostname", "SELECT * FROM read_json('/etc/hostname')"),
            ("sniff_csv /etc/passwd", "SELECT * FROM sniff_csv('/etc/passwd')"),
            ("glob /", "SELECT * FROM glob('/*')"),
            ("glob cwd", "SELECT * FROM glob('*')"),
            ("read_text .tmp (default temp dir)", "SELECT * FROM read_text('.tmp/*')"),
            ("glob .tmp (default temp dir)", "SELECT * FROM glob('.tmp/*')"),
            ("read_text canary", "SELECT * FROM read_text('{canary}')"),
            ("replacement scan canary", "SELECT * FROM '{canary}'"),
            ("read_ndjson_objects canary", "SELECT * FROM read_ndjson_objects('{canary}')"),
            ("file:// url", "SELECT * FROM read_text('file:///etc/passwd')"),
            ("read_parquet a metadata part", "SELECT count(*) FROM read_parquet('{part}')"),
            ("parquet_metadata of a part", "SELECT * FROM parquet_metadata('{part}')"),
            ("read_parquet the takedown list", "SELECT * FROM read_parquet('{takedown}')"),
            ("read_text the collection", "SELECT * FROM read_text('{collection}/*')"),
            ("/proc/self/environ", "SELECT * FROM read_text('/proc/self/environ')"),
            ("/proc/1/cmdline", "SELECT * FROM read_text('/proc/1/cmdline')"),
            ("home folder", "SELECT * FROM read_text('~/.bash_history')"),
            ("other workers' temp", "SELECT * FROM read_text('/tmp/sieve-*/tmp/*')"),
        ],
    ),
    *_attacks(
        "network",
        REFUSED,
        [
            ("read_csv http", "SELECT * FROM read_csv('http://127.0.0.1:{port}/a.csv')"),
            ("read_parquet http", "SELECT * FROM read_parquet('http://127.0.0.1:{port}/a.pq')"),
            ("replacement scan http", "SELECT * FROM 'http://127.0.0.1:{port}/b.parquet'"),
            ("read_json http", "SELECT * FROM read_json('http://127.0.0.1:{port}/c.json')"),
            ("read_text localhost", "SELECT * FROM read_text('http://localhost:{port}/d')"),
            ("read_blob https", "SELECT * FROM read_blob('https://127.0.0.1:{port}/e')"),
            ("ipv6 loopback", "SELECT * FROM read_csv('http://[::1]:{port}/f.csv')"),
            ("url in a list", "SELECT * FROM read_text(['http://127.0.0.1:{port}/g', '/x'])"),
            ("attach over http", "ATTACH 'http://127.0.0.1:{port}/h.db' AS h"),
            ("install from loopback", "INSTALL httpfs FROM 'http://127.0.0.1:{port}'"),
            ("iceberg over http", "SELECT * FROM iceberg_scan('http://127.0.0.1:{port}/i')"),
            ("postgres to loopback", "SELECT * FROM postgres_scan('port={port}', 'p', 't')"),
        ],
    ),
    *_attacks(
        "extensions",
        REFUSED,
        [
            ("install httpfs", "INSTALL httpfs"),
            ("load httpfs", "LOAD httpfs"),
            ("force install spatial", "FORCE INSTALL spatial"),
            ("load a file", "LOAD '{canary_dir}/evil.duckdb_extension'"),
            ("update extensions", "UPDATE EXTENSIONS"),
            ("sqlite autoload", "SELECT * FROM sqlite_scan('{canary_dir}/x.db', 't')"),
            ("spatial autoload", "SELECT ST_Point(1, 2) AS p"),
            ("excel autoload", "SELECT * FROM read_xlsx('{canary_dir}/x.xlsx')"),
            ("delta autoload", "SELECT * FROM delta_scan('{canary_dir}')"),
            ("iceberg autoload", "SELECT * FROM iceberg_metadata('{canary_dir}')"),
            ("mysql autoload", "SELECT * FROM mysql_query('db', 'SELECT 1')"),
            ("fts pragma", "PRAGMA create_fts_index('samples', 'key', 'caption')"),
        ],
    ),
    *_attacks(
        "settings",
        REFUSED,
        [
            ("external access on", "SET enable_external_access = true"),
            ("unlock", "SET lock_configuration = false"),
            ("reset all", "RESET ALL"),
            ("threads", "SET threads = 64"),
            ("pragma threads", "PRAGMA threads = 64"),
            ("memory limit", "SET memory_limit = '100GB'"),
            ("global temp size", "SET GLOBAL max_temp_directory_size = '100GB'"),
            ("temp directory", "SET temp_directory = '/tmp'"),
            ("allowed directories", "SET allowed_directories = ['/']"),
            ("allowed paths", "SET allowed_paths = ['/etc/passwd']"),
            ("autoinstall", "SET autoinstall_known_extensions = true"),
            ("extension repository", "SET custom_extension_repository = 'http://127.0.0.1:{port}'"),
            ("secret directory", "SET secret_directory = '{canary_dir}'"),
            ("search path", "SET search_path = 'system'"),
            ("variable", "SET VARIABLE x = 1"),
            ("reset a setting", "RESET memory_limit"),
        ],
    ),
    *_attacks(
        "statements",
        REFUSED,
        [
            ("copy query to file", "COPY (SELECT * FROM samples) TO '{leak}'"),
            ("copy table to parquet", "COPY samples TO '{leak}' (FORMAT parquet)"),
            ("export database", "EXPORT DATABASE '{leak}'"),
            ("attach a file", "ATTACH '{leak}' AS x"),
            ("detach", "DETACH memory"),
            ("create table", "CREATE TABLE t AS SELECT 1 AS x"),
            ("replace the view", "CREATE OR REPLACE VIEW samples AS SELECT 1 AS x"),
            ("drop the view", "DROP VIEW samples"),
            ("insert", "INSERT INTO samples VALUES (1)"),
            ("update", "UPDATE samples SET key = 'x'"),
            ("delete", "DELETE FROM samples"),
            ("alter", "ALTER VIEW samples RENAME TO gone"),
            ("create macro", "CREATE MACRO m(a) AS a"),
            ("create secret", "CREATE SECRET (TYPE s3, KEY_ID 'x', SECRET 'y')"),
            ("prepare", "PREPARE p AS SELECT 1"),
            ("call", "CALL duckdb_settings()"),
            ("checkpoint", "CHECKPOINT"),
            ("vacuum", "VACUUM"),
            ("begin", "BEGIN TRANSACTION"),
            ("use", "USE memory"),
            ("explain analyze", "EXPLAIN ANALYZE SELECT * FROM samples"),
            ("two statements", "SELECT 1; DROP VIEW samples"),
            ("hidden in a block comment", "SELECT 1 /* ; */ ; DROP VIEW samples"),
            ("after a line comment", "SELECT 1 -- x\n; DROP VIEW samples"),
            ("select then copy", "SELECT * FROM samples; COPY samples TO '{leak}'"),
            ("insert in a CTE", "WITH x AS (SELECT 1) INSERT INTO samples SELECT * FROM x"),
        ],
    ),
    *_attacks(
        "resource exhaustion",
        BOUNDED,
        [
            ("cross join for minutes", HOSTILE_SQL),
            ("a long sum", "SELECT sum(range) AS s FROM range(10000000000000)"),
            (
                "endless recursion",
                "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t) "
                "SELECT max(n) AS m FROM t",
            ),
            ("a list of 400M", "SELECT list(range(400000000)) AS l"),
            ("a 3 GB string", "SELECT repeat('x', 3000000000) AS s"),
            ("string_agg of 3 GB", "SELECT string_agg(repeat('x', 1000), ',') FROM range(3000000)"),
            ("list of long strings", "SELECT list(repeat('x', 1000)) FROM range(3000000)"),
            ("generate_series of 10G", "SELECT generate_series(1, 10000000000) AS g"),
            ("100 MB result", "SELECT repeat('x', 1000000) AS s FROM range(100)"),
            ("3000 columns", _WIDE),
            ("rows without end", "SELECT * FROM range(1000000000000)"),
            ("self join to the 4th", "SELECT * FROM samples a, samples b, samples c, samples d"),
            (
                "aggregate over a 5-way join",
                "SELECT max(a.key || b.key || c.key || d.key || e.key) AS m "
                "FROM samples a, samples b, samples c, samples d, samples e",
            ),
            # no LIMIT: the whole sort precedes the first row (a top-N heap would be cheap)
            ("sort of 1G random", "SELECT range FROM range(1000000000) ORDER BY random()"),
            (
                "join explosion",
                "SELECT count(*) FROM (SELECT range % 10 AS k FROM range(10000000)) a "
                "JOIN (SELECT range % 10 AS k FROM range(10000000)) b USING (k)",
            ),
            ("3000 nested parentheses", _DEEP),
            ("1 MB of query text", _LONG),
        ],
    ),
    # DuckDB's regular expressions (RE2) run in linear time: this one answers within the limits
    SqlAttack(
        "resource exhaustion",
        "backtracking regex over 100 MB",
        "SELECT regexp_matches(repeat('a', 100000000), '(a|aa)*b') AS m",
        SURVIVES,
    ),
    *_attacks(
        "type edge cases",
        SURVIVES,
        [
            ("TIME 24:00:00", "SELECT TIME '24:00:00' AS t", "24:00:00"),
            ("TIME_NS 24:00:00", "SELECT '24:00:00'::TIME_NS AS t"),
            ("TIMETZ 24:00:00+15:59", "SELECT TIMETZ '24:00:00+15:59' AS t"),
            ("TIMETZ offset", "SELECT TIMETZ '12:00:00+01' AS t", "12:00:00+01"),
            (
                "HUGEINT max",
                "SELECT 170141183460469231731687303715884105727::HUGEINT AS h",
                "170141183460469231731687303715884105727",
            ),
            (
                "HUGEINT min",
                "SELECT (-170141183460469231731687303715884105727 - 1)::HUGEINT AS h",
                "-170141183460469231731687303715884105728",
            ),
            ("HUGEINT 1e38", "SELECT 100000000000000000000000000000000000000::HUGEINT AS h"),
            (
                "UHUGEINT max",
                "SELECT 340282366920938463463374607431768211455::UHUGEINT AS u",
                "340282366920938463463374607431768211455",
            ),
            (
                "sum to HUGEINT",
                "SELECT sum(width) AS s, sum(9223372036854775807) AS big FROM samples",
            ),
            ("DATE infinity", "SELECT DATE 'infinity' AS d, DATE '-infinity' AS e"),
            ("DATE max", "SELECT DATE '5881580-07-10' AS d"),
            (
                "TIMESTAMP infinity",
                "SELECT TIMESTAMP 'infinity' AS t, TIMESTAMPTZ '-infinity' AS z",
            ),
            ("TIMESTAMP_NS infinity", "SELECT 'infinity'::TIMESTAMP_NS AS t"),
            ("TIMESTAMP_S far past", "SELECT TIMESTAMP_S '290309-12-22 (BC) 00:00:00' AS t"),
            ("INTERVAL max", "SELECT INTERVAL 2147483647 MONTH + INTERVAL 2147483647 DAY AS i"),
            ("UNION", "SELECT union_value(k := 1)::UNION(k INT, s VARCHAR) AS u"),
            ("MAP", "SELECT MAP {'a': [1, 2]} AS m"),
            ("nested STRUCT and LIST", "SELECT {'a': [[1, 2], []], 'b': {'c': NULL}} AS s"),
            ("ARRAY", "SELECT [1, 2, 3]::INT[3] AS a"),
            ("ENUM", "SELECT 'a'::ENUM('a', 'b') AS e"),
            ("UUID", "SELECT uuid() AS u"),
            ("BLOB not UTF-8", "SELECT '\\xFF\\x00'::BLOB AS b"),
            ("BIT", "SELECT '0101'::BIT AS b", "0101"),
            ("BIGNUM", "SELECT (10::BIGNUM) * 1000000000000000000000000000000000000000 AS g"),
            ("VARIANT", "SELECT [1, 2]::VARIANT AS v"),
            ("GEOMETRY", "SELECT 'POINT(1 2)'::GEOMETRY AS g", "POINT"),
            (
                "DECIMAL(38,10) max",
                "SELECT 9999999999999999999999999999.9999999999::DECIMAL(38,10) d",
            ),
            ("NaN and infinities", "SELECT 'nan'::DOUBLE AS a, '-inf'::FLOAT AS b"),
            ("NULL type", "SELECT NULL AS n, [] AS l, {'': 1} AS s"),
            ("JSON", "SELECT '{\"a\": [1, null]}'::JSON AS j"),
            ("TIME in a list", "SELECT [TIME '24:00:00', TIME '01:00:00'] AS l"),
            (
                "UHUGEINT in a struct",
                "SELECT {'u': 340282366920938463463374607431768211455::UHUGEINT} s",
            ),
            ("duplicate names", "SELECT 1 AS a, TIME '24:00:00' AS a"),
            ("odd column name", 'SELECT 1 AS "a""\nb", \'nul\\0byte\' AS "\u00e9"'),
            (
                "error after the first batch",
                "SELECT CASE WHEN range > 5000 THEN error('boom') "
                "ELSE range END AS r FROM range(10000)",
            ),
            (
                "cast error after the first batch",
                "SELECT CASE WHEN range > 5000 THEN 'x'::INT ELSE range END AS r FROM range(10000)",
            ),
            ("division by zero", "SELECT 1 // 0 AS a, 1 / 0 AS b"),
            ("no rows", "SELECT * FROM samples WHERE false"),
        ],
    ),
]


class _Loopback(http.server.ThreadingHTTPServer):
    """An HTTP server on 127.0.0.1 that counts the requests it gets."""

    hits = 0


class _Counter(http.server.BaseHTTPRequestHandler):
    """Counts every request; answers 404 so nothing is ever served."""

    server: _Loopback

    def do_GET(self) -> None:  # http.server's naming
        self.server.hits += 1
        self.send_error(404)

    do_HEAD = do_POST = do_GET

    def log_message(self, *args: Any) -> None:
        pass  # a hit is counted, not printed


class Probe:
    """What the attacks are judged against, for one untrusted catalog. Writes its canaries into
    `workdir` (and `workdir/.tmp/`, the old temp-directory hole: run from `workdir`), one into
    the collection folder, and listens on 127.0.0.1 only."""

    def __init__(self, catalog: Catalog, collection: str, workdir: Path) -> None:
        self.catalog, self.collection, self.workdir = catalog, collection, Path(workdir)
        self.token = "sieve-canary-" + secrets.token_hex(8)
        canary_dir = self.workdir / "canary"
        for folder in (canary_dir, self.workdir / ".tmp"):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "canary.txt").write_text(self.token + "\n")
        (Path(collection) / "canary.txt").write_text(self.token + "\n")
        self.leak = self.workdir / "leak.out"
        self.server = _Loopback(("127.0.0.1", 0), _Counter)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        layout = S.CollectionLayout(collection)
        self.values = {
            "canary": str(canary_dir / "canary.txt"),
            "canary_dir": str(canary_dir),
            "collection": collection,
            "part": layout.metadata(0),
            "takedown": layout.takedown,
            "port": self.server.server_address[1],
            "leak": str(self.leak),
        }
        catalog.start()
        self.rows = self._count()
        self.settings = self._settings()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _count(self) -> int:
        table = self.catalog.query("SELECT count(*) AS n FROM samples", client=CHECKER).table
        return int(table.column(0)[0].as_py())

    def _settings(self) -> list[Any]:
        pool = self.catalog.sandbox
        assert pool is not None, "the probe needs an untrusted catalog"
        return [w.query(SETTINGS_SQL, 1)[0].to_pylist() for w in pool.workers]

    def _workers(self) -> tuple[list[int | None], int]:
        pool = self.catalog.sandbox
        assert pool is not None
        return pool.pids, pool.restarts

    def fill(self, sql: str) -> str:
        """The attack's SQL with its placeholders filled (other braces are SQL's own)."""
        names = "|".join(self.values)
        return re.sub(r"\{(" + names + r")\}", lambda m: str(self.values[m.group(1)]), sql)

    def run(self, attack: SqlAttack) -> tuple[bool, str]:
        """(held, what happened) for one attack."""
        sql = self.fill(attack.sql)
        hits, workers = self.server.hits, self._workers()
        problems: list[str] = []
        try:
            result = self.catalog.query(sql, client=ATTACKER)
            error = None
            text = str(printable(result.table).to_pylist())
            outcome = f"{result.table.num_rows} rows" + (", cut short" if result.truncated else "")
        except SqlError as exc:
            result, error, text = None, str(exc), str(exc)
            outcome = f"refused: {error}"
        if attack.expect == REFUSED and error is None:
            problems.append("it was answered")
        if attack.expect == BOUNDED and result is not None and not result.truncated:
            problems.append("it ran to completion")
        if error is not None and ("\n" in error or not error.strip()):
            problems.append("the error is not one line")
        if attack.shows and error is None and attack.shows not in text:
            problems.append(f"the answer lacks {attack.shows!r}")
        if attack.expect == SURVIVES:
            if error is not None and ("died" in error or "does not validate" in error):
                problems.append("the worker failed on a legal query")
            if self._workers() != workers:
                problems.append("a worker was restarted")
        problems += self._breaches(text, hits)
        return not problems, outcome[:300] + "".join(f"; BREACH: {p}" for p in problems)

    def _breaches(self, text: str, hits: int) -> list[str]:
        """What an attack changed that none may: checked after every one."""
        out = []
        if self.token in text:
            out.append("a canary file's content came back")
        if self.server.hits != hits:
            out.append(f"the loopback server got {self.server.hits - hits} requests")
        if os.path.lexists(self.leak) or os.path.lexists(f"{self.leak}.wal"):
            out.append(f"{self.leak} was written")
        try:
            rows = self._count()
            if rows != self.rows:
                out.append(f"samples has {rows} rows, not {self.rows}")
            if self._settings() != self.settings:
                out.append("a worker's settings or loaded extensions changed")
        except SqlError as exc:
            out.append(f"the catalog stopped answering: {exc}")
        return out


def sql_attacks(probe: Probe) -> list[tuple[str, str, Callable[[], tuple[bool, str]]]]:
    """Every SQL attack as (category, name, a callable returning (held, detail))."""
    return [(a.category, a.name, lambda a=a: probe.run(a)) for a in SQL_ATTACKS]
