"""Web attacks on the UI (part of `bench.security_web.web_attacks`): paths typed into the
image-path box, "Export to" and "Open another collection" (`webui.roots`, which those widgets
call), and results of every DuckDB type given to the SQL page's converter and downloads
(`webui.tables`). Each returns (held, detail)."""

from __future__ import annotations

import functools
import os
import threading
import tracemalloc
from pathlib import Path
from typing import Any, Callable

import duckdb
import pyarrow as pa
import tomllib
from PIL import Image

from bench.security_lab import PATHS, RENDERING, REPO, Lab, attack
from webui import roots as R, tables

#: a file the refusal must not reveal, wherever it runs
SYSTEM_FILE = "/etc/passwd"


# ---- UI paths -----------------------------------------------------------------------------
class Ground:
    """A data root with an image, a FIFO, a sparse 64 MiB file and links leading out; beside it
    a folder outside the root (with a secret) and a sibling whose name extends the root's."""

    def __init__(self, workdir: Path) -> None:
        base = workdir / "paths"
        self.root, self.outside, self.sibling = base / "root", base / "outside", base / "root-evil"
        for d in (self.root, self.outside, self.sibling):
            d.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (200, 10, 10)).save(self.root / "query.png")
        Image.new("RGB", (8, 8), (10, 10, 200)).save(self.outside / "secret.png")
        (self.sibling / "x.png").write_bytes((self.root / "query.png").read_bytes())
        with open(self.root / "huge.png", "wb") as fh:
            fh.truncate(64 * 2**20)
        for link, target in (("out.png", self.outside / "secret.png"), ("out", self.outside)):
            if not (self.root / link).is_symlink():
                (self.root / link).symlink_to(target)
        if not (self.root / "pipe.png").exists():
            os.mkfifo(self.root / "pipe.png")
        self.roots = R.roots_of([str(self.root)])


@functools.lru_cache(maxsize=8)
def _ground(workdir: str) -> Ground:
    return Ground(Path(workdir))


def _refusal(call: Callable[[], Any]) -> str | None:
    """The message of an OutsideRoots the call raised; None when it did not refuse."""
    try:
        call()
    except R.OutsideRoots as exc:
        return str(exc)
    return None


def _path_attack(name: str, typed: Callable[[Ground], str], what: str = "image") -> None:
    """A typed path that must be refused with the very words an absent path outside gets."""

    def run(lab: Lab) -> tuple[bool, str]:
        g = _ground(str(lab.workdir))
        call = R.read_image if what == "image" else R.export_folder
        text = typed(g)
        got = _refusal(lambda: call(text, g.roots))
        absent = _refusal(lambda: call(str(g.outside / "no-such-file.png"), g.roots))
        held = got is not None and got == absent
        return held, f"{text[:60]!r}: {got or 'NOT REFUSED'}"[:200]

    attack(PATHS, name)(run)


_path_attack("image path: a system file", lambda g: SYSTEM_FILE)
_path_attack("image path: a file outside", lambda g: str(g.outside / "secret.png"))
_path_attack("image path: .. out of the root", lambda g: f"{g.root}/../outside/secret.png")
_path_attack("image path: a symlink leading out", lambda g: str(g.root / "out.png"))
_path_attack("image path: through a linked folder", lambda g: str(g.root / "out" / "secret.png"))
_path_attack("image path: a sibling named like the root", lambda g: str(g.sibling / "x.png"))
_path_attack("image path: the home folder", lambda g: "~/.bashrc")
_path_attack("image path: relative climbing", lambda g: "../../../../../../etc/passwd")
_path_attack("image path: a NUL byte", lambda g: f"{g.root}/query.png\x00/../../etc/passwd")
_path_attack("image path: a file:// URL", lambda g: f"file://{SYSTEM_FILE}")
_path_attack("image path: /proc of the app", lambda g: "/proc/self/environ")
_path_attack("export folder: outside", lambda g: str(g.outside / "export"), "export")
_path_attack("export folder: an existing system folder", lambda g: "/tmp", "export")
_path_attack("export folder: through a link", lambda g: str(g.root / "out" / "exp"), "export")
_path_attack("export folder: an object store", lambda g: "s3://bucket/export", "export")


@attack(PATHS, "image path: a FIFO inside the root")
def _fifo(lab: Lab) -> tuple[bool, str]:
    g = _ground(str(lab.workdir))
    outcome: list[str] = []

    def read() -> None:
        try:
            R.read_image(str(g.root / "pipe.png"), g.roots)
            outcome.append("read")
        except ValueError as exc:
            outcome.append(str(exc))

    t = threading.Thread(target=read, daemon=True)  # a blocking open would hang here, not the run
    t.start()
    t.join(10)
    held = bool(outcome) and "regular file" in outcome[0]
    return held, outcome[0] if outcome else "the read blocked"


@attack(PATHS, "image path: 64 MiB inside the root")
def _huge(lab: Lab) -> tuple[bool, str]:
    g = _ground(str(lab.workdir))
    tracemalloc.start()
    try:
        R.read_image(str(g.root / "huge.png"), g.roots)
        outcome = "read"
    except ValueError as exc:
        outcome = str(exc)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return "larger than" in outcome and peak < 2**20, f"{outcome} (peak {peak:,} B)"


@attack(PATHS, "image path: a file inside the root still works")
def _inside(lab: Lab) -> tuple[bool, str]:
    g = _ground(str(lab.workdir))
    data = R.read_image(str(g.root / "query.png"), g.roots)
    return data.startswith(b"\x89PNG"), f"{len(data)} bytes read"


@attack(PATHS, "open another collection outside the roots")
def _open_outside(lab: Lab) -> tuple[bool, str]:
    g = _ground(str(lab.workdir))
    got = _refusal(lambda: R.inside_roots(str(g.outside), g.roots, "Open another collection"))
    absent = _refusal(lambda: R.inside_roots("/no/such", g.roots, "Open another collection"))
    return got is not None and got == absent, got or "NOT REFUSED"


@attack(PATHS, "the default export folder lies under the roots")
def _default_export(lab: Lab) -> tuple[bool, str]:
    g = _ground(str(lab.workdir))
    coll = str(g.root / "collection")
    out = R.default_export(coll, "reds", R.roots_of([coll]))
    return _refusal(lambda: R.export_folder(out, R.roots_of([coll]))) is None, out


@attack(PATHS, "Streamlit listens on localhost by default")
def _localhost(lab: Lab) -> tuple[bool, str]:
    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    address = config.get("server", {}).get("address")
    readme = (REPO / "README.md").read_text()
    held = (
        address == "127.0.0.1" and "streamlit run webui/app.py --server.address 127.0.0.1" in readme
    )
    return held, f".streamlit/config.toml server.address = {address!r}"


# ---- UI type rendering --------------------------------------------------------------------
def _shown(table: pa.Table, expect: str = "", **caps: Any) -> tuple[bool, str]:
    """The SQL page's conversion and both downloads of `table`: nothing raises but a clear
    ResultTooLarge, the frame stays within its caps, and `expect` appears in it."""
    tracemalloc.start()
    try:
        shown = tables.for_display(table, **caps)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    for fmt in ("csv", "parquet"):
        try:
            tables.download(table, fmt)
        except tables.ResultTooLarge:
            pass
    used = int(shown.frame.memory_usage(deep=True).sum())
    cap = caps.get("max_bytes", tables.MAX_BYTES)
    text = shown.frame.astype(str).to_string(index=False, max_rows=3, max_colwidth=40)
    within = used <= cap and shown.rows <= caps.get("max_rows", tables.MAX_ROWS)
    held = within and peak <= 4 * cap and (not expect or expect in text)
    detail = f"{shown.rows} rows, {used / 2**20:.1f} MiB, peak {peak / 2**20:.0f} MiB; {text}"
    return held, " ".join(detail.split())[:200]


def _sql_attack(name: str, sql: str, expect: str = "") -> None:
    def run(lab: Lab) -> tuple[bool, str]:
        with duckdb.connect() as con:  # the Arrow DuckDB hands any caller, the page included
            table = con.sql(sql).to_arrow_table()
        return _shown(table, expect)

    attack(RENDERING, name)(run)


def _arrow_attack(name: str, make: Callable[[], pa.Table], expect: str = "", **caps: Any):
    attack(RENDERING, name)(lambda lab: _shown(make(), expect, **caps))


_sql_attack("DATE 'infinity'", "SELECT DATE 'infinity' AS d, DATE '-infinity' AS e", "-infinity")
_sql_attack("a date before year 1", "SELECT DATE '5877642-06-25 (BC)' AS d", "(BC)")
_sql_attack("TIMESTAMP 'infinity'", "SELECT TIMESTAMP 'infinity' AS t", "infinity")
_sql_attack("TIMESTAMPTZ far out", "SELECT TIMESTAMPTZ '294246-12-31 00:00:00+00' AS t", "UTC")
_sql_attack("TIME '24:00:00'", "SELECT TIME '24:00:00' AS t", "24:00:00")
_sql_attack("a UNION value", "SELECT union_value(b := 'x')::UNION(a INT, b VARCHAR) AS u", "x")
_sql_attack("HUGEINT at its extremes", "SELECT (-(2::HUGEINT ** 127 - 1))::HUGEINT AS h", "-1")
_sql_attack("UHUGEINT's largest", "SELECT 340282366920938463463374607431768211455::UHUGEINT AS h")
_sql_attack("INTERVAL", "SELECT INTERVAL '1 year 3 days 04:05:06' AS i", "3 days")
_sql_attack("a list() of 2 million", "SELECT list(i) AS l FROM range(2000000) t(i)", "[0, 1")
_sql_attack(
    "200,000 small lists and structs",
    "SELECT [i, i + 1] AS l, {'x': i, 'y': [i]} AS s FROM range(200000) t(i)",
    "'x': 0",
)
_sql_attack("a MAP of lists", "SELECT MAP {'k': [1, 2], 'z': NULL} AS m", "'k'=[1, 2]")
_sql_attack("a BLOB", "SELECT '\\xAA\\x00ab'::BLOB AS b", "\\xAA\\x00ab")
_sql_attack("a 50 MB string", "SELECT repeat('x', 50000000) AS s", "xxx")
_sql_attack("a million rows", "SELECT i, 'key' || i AS k FROM range(1000000) t(i)")
_sql_attack("VARINT, BIT, ENUM, UUID", "SELECT 10::VARINT a, '01'::BIT b, 'x'::ENUM('x') c")
_sql_attack("the same column name twice", "SELECT 1 AS a, 2 AS a", "2")
_sql_attack("60 levels of nesting", "SELECT " + "[" * 60 + "1" + "]" * 60 + " AS deep", "[[[")
_sql_attack(
    "300 columns of 10 kB strings",
    "SELECT " + ", ".join(f"repeat('y', 10000) AS c{i}" for i in range(300)) + " FROM range(50)",
)
_arrow_attack(
    "a time past 24:00 in raw Arrow",
    lambda: pa.table({"t": pa.array([86_400_000_000, 10**15], pa.time64("us"))}),
    "277777:46:40",
)
_arrow_attack(
    "broken UTF-8 in a string column",
    lambda: pa.table(
        {
            "s": pa.Array.from_buffers(
                pa.string(), 1, [None, pa.py_buffer(b"\0\0\0\0\2\0\0\0"), pa.py_buffer(b"\xff\xfe")]
            )
        }
    ),
)
_arrow_attack(
    "a row cap and a byte cap together",
    lambda: pa.table({"s": pa.array(["z" * 5000] * 5000)}),
    max_rows=4000,
    max_bytes=2 * 2**20,
)
_arrow_attack("no columns at all", lambda: pa.table({}))


@attack(RENDERING, "a download past its cap")
def _download_cap(lab: Lab) -> tuple[bool, str]:
    table = pa.table({"s": pa.array(["w" * 1000] * 5000)})
    try:
        tables.download(table, "csv", max_bytes=2**20)
    except tables.ResultTooLarge as exc:
        return True, str(exc)
    return False, "a 5 MB CSV was made under a 1 MiB cap"
