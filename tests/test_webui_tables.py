"""The SQL page's conversion guard (`webui.tables`), called directly: sizes counted before any
conversion, row and byte caps together, every DuckDB type shown (or its text), downloads."""

from __future__ import annotations

import datetime as dt
import tracemalloc

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from webui import tables


def arrow(sql: str) -> pa.Table:
    with duckdb.connect() as con:
        return con.sql(sql).to_arrow_table()


#: (query, what its cell shows, whether a plain `to_pandas()` raises on it)
TYPES = [
    ("SELECT DATE 'infinity' AS v", "infinity", True),
    ("SELECT DATE '-infinity' AS v", "-infinity", True),
    ("SELECT DATE '0044-03-15 (BC)' AS v", "0044-03-15 (BC)", True),
    ("SELECT TIMESTAMP 'infinity' AS v", "infinity", False),
    ("SELECT TIMESTAMP '2024-02-29 23:59:59.25' AS v", "2024-02-29 23:59:59.25", False),
    ("SELECT TIMESTAMPTZ '2020-01-01 10:00:00+02' AS v", "2020-01-01 08:00:00 UTC", False),
    (
        "SELECT TIMESTAMP_NS '2020-01-01 00:00:00.123456789' AS v",
        "2020-01-01 00:00:00.123456789",
        False,
    ),
    ("SELECT TIME '24:00:00' AS v", "24:00:00", True),
    ("SELECT union_value(b := 'x')::UNION(a INT, b VARCHAR) AS v", "x", True),
    (
        "SELECT -170141183460469231731687303715884105727::HUGEINT AS v",
        "-170141183460469231731687303715884105727",
        False,
    ),
    ("SELECT INTERVAL '1 year 3 days 04:05:06' AS v", "12 months 3 days 04:05:06", False),
    ("SELECT MAP {'k': [1, 2], 'z': NULL} AS v", "{'k'=[1, 2], 'z'=NULL}", False),
    ("SELECT {'a': 1, 'b': [DATE 'infinity']} AS v", "{'a': 1, 'b': [infinity]}", True),
    ("SELECT '\\xAA\\x00ab'::BLOB AS v", "\\xAA\\x00ab", False),
    ("SELECT 'x'::ENUM('x', 'y') AS v", "x", False),
    ("SELECT [1, 2, 3]::INT[3] AS v", "[1, 2, 3]", False),
    ("SELECT ['a', NULL] AS v", "['a', NULL]", False),
]


@pytest.mark.parametrize("sql,expected,naive_raises", TYPES)
def test_every_duckdb_type_is_shown_or_written_as_its_text(sql, expected, naive_raises):
    table = arrow(sql)
    if naive_raises:  # what the page used to do with it
        with pytest.raises((ValueError, pa.ArrowException)):
            table.to_pandas()
    shown = tables.for_display(table)
    assert shown.frame["v"][0] == expected
    for fmt in ("csv", "parquet"):
        assert tables.download(table, fmt)


def test_dates_agree_with_python_wherever_python_has_them():
    rng = np.random.default_rng(0)
    days = rng.integers(dt.date(1, 1, 1).toordinal(), dt.date(9999, 12, 31).toordinal(), 2000)
    epoch = dt.date(1970, 1, 1).toordinal()
    table = pa.table({"d": pa.array((days - epoch).astype(np.int32), pa.date32())})
    shown = tables.for_display(table).frame["d"].tolist()
    assert shown == [dt.date.fromordinal(int(d)).isoformat() for d in days]


def test_a_list_aggregate_costs_its_shown_text_not_its_pandas_form():
    """What 0.24 MiB of Arrow once cost +191 MiB in pandas: lists and structs per row."""
    table = arrow("SELECT [i, i + 1] AS l, {'x': i, 'y': [i]} AS s FROM range(100000) t(i)")
    tracemalloc.start()
    table.to_pandas()
    naive = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    shown = tables.for_display(table, max_rows=100_000, max_bytes=4 * 2**20)
    guarded = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    used = shown.frame.memory_usage(deep=True).sum()
    assert used <= 4 * 2**20 and shown.cut_by == "bytes" and 0 < shown.rows < 100_000
    assert guarded < naive / 4 and guarded < 16 * 2**20, (naive, guarded)
    assert shown.frame["s"][0] == "{'x': 0, 'y': [0]}" and "size cap" in shown.note()


def test_row_and_byte_caps_hold_together():
    wide = pa.table({"s": pa.array(["z" * 5000] * 4000), "n": pa.array(range(4000))})
    by_rows = tables.for_display(wide, max_rows=10, max_bytes=2**30)
    by_bytes = tables.for_display(wide, max_rows=4000, max_bytes=2**20)
    assert (by_rows.rows, by_rows.cut_by) == (10, "rows")
    assert by_bytes.cut_by == "bytes" and by_bytes.frame.memory_usage(deep=True).sum() <= 2**20
    assert by_bytes.clipped_cells == by_bytes.rows  # each 5,000-character value cut at 1,000
    assert set(by_bytes.frame["s"].str.len()) == {tables.MAX_CELL_CHARS}
    assert by_bytes.frame["n"].dtype == "Int64"  # integers stay integers


def test_huge_values_cost_their_cut_text():
    table = arrow("SELECT repeat('x', 30000000) AS s, list(i) AS l FROM range(3000000) t(i)")
    tracemalloc.start()
    shown = tables.for_display(table)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert shown.clipped_cells == 2 and peak < 2**20
    assert shown.frame["l"][0].startswith("[0, 1, 2") and shown.frame["l"][0].endswith("…")


def test_odd_columns_do_not_break_the_frame():
    raw = pa.Array.from_buffers(
        pa.string(), 1, [None, pa.py_buffer(b"\0\0\0\0\2\0\0\0"), pa.py_buffer(b"\xff\xfe")]
    )
    shown = tables.for_display(pa.table({"s": raw}))
    assert shown.frame["s"][0] == "\ufffd\ufffd" and shown.text_columns == ["s"]
    twice = tables.for_display(arrow("SELECT 1 AS a, 2 AS a, NULL AS n"))
    assert list(twice.frame.columns) == ["a", "a (2)", "n"]
    assert tables.for_display(pa.table({})).frame.shape == (0, 0)
    deep = tables.for_display(arrow("SELECT " + "[" * 60 + "1" + "]" * 60 + " AS d"))
    assert deep.frame["d"][0].startswith("[" * tables.MAX_DEPTH)


def test_downloads_keep_their_cap_and_say_how_to_shrink():
    table = pa.table({"s": pa.array(["w" * 1000] * 5000)})
    with pytest.raises(tables.ResultTooLarge, match="fewer rows"):
        tables.download(table, "csv", max_bytes=2**20)
    nested = arrow("SELECT [i] AS l FROM range(200000) t(i)")
    with pytest.raises(tables.ResultTooLarge, match="parquet"):
        tables.download(nested, "csv")
    assert tables.download(nested, "parquet")[:4] == b"PAR1"
    with pytest.raises(ValueError, match="unknown"):
        tables.download(table, "xlsx")
