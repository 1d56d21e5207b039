"""`python -m curation.sql COLLECTION "SELECT ... FROM samples" [--format FORMAT] [--out FILE]`.
`python -m curation.sql --check-sandbox`: the OS layers an untrusted query runs under here.
FORMAT is table (the default), csv, parquet or json.

SQL over the collection's metadata (table `samples`: every schema column, the source's own
columns and `id`, the global vector id), with DuckDB. Your own queries run in process with
no limits; `--untrusted` runs the query the way the UI's query box does (sandboxed worker,
one SELECT, time / memory / row caps, taken-down rows invisible). `--out` writes the result
atomically; without it the result goes to stdout (parquet needs `--out`). Values Python cannot
hold (DATE 'infinity', a UNION in a table) are printed as their Arrow text.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from collection.storage import write_bytes
from models.runtime import setup_logging

FORMATS = ("table", "csv", "parquet", "json")


def _value_text(value: pa.Scalar) -> str | None:
    """One value as text: Python's form where Python can hold it, else Arrow's own."""
    if not value.is_valid:
        return None
    try:
        return str(value.as_py())
    except (OverflowError, ValueError, pa.ArrowException):
        return str(value)


def printable(table: pa.Table, pandas: bool = False) -> pa.Table:
    """The table with each column Python (or pandas, when asked) cannot convert as text, so
    printing it never fails on a legal value: DATE 'infinity', a UNION, an out-of-range time."""
    columns = []
    for column in table.columns:
        probe = pa.table([column], names=["c"])
        try:
            probe.to_pandas() if pandas else column.to_pylist()
        except (OverflowError, ValueError, pa.ArrowException):
            try:
                column = pc.cast(column, pa.string())
            except pa.ArrowException:
                column = pa.chunked_array(
                    [pa.array([_value_text(v) for v in column], pa.string())], pa.string()
                )
        columns.append(column)
    return pa.Table.from_arrays(columns, names=table.column_names)


def format_result(table: Any, fmt: str, max_rows: int | None = None) -> bytes:
    """A pyarrow Table as bytes in one of FORMATS (`table`: aligned text for a terminal)."""
    if fmt == "csv":
        buf = io.BytesIO()
        pacsv.write_csv(table, buf)
        return buf.getvalue()
    if fmt == "parquet":
        buf = io.BytesIO()
        pq.write_table(table, buf)
        return buf.getvalue()
    if fmt == "json":
        rows = printable(table).to_pylist()
        return (json.dumps(rows, default=str, indent=1) + "\n").encode()
    if fmt == "table":
        frame = printable(table, pandas=True).to_pandas()
        text = (
            frame.to_string(index=False, max_rows=max_rows)
            if len(frame.columns)
            else "(no columns)"
        )
        return (text + f"\n({table.num_rows} rows)\n").encode()
    raise ValueError(f"--format: unknown {fmt!r}; expected one of {FORMATS}")


def sql(
    collection: str,
    query: str,
    format: str = "table",
    out: str | None = None,
    untrusted: bool = False,
    row_cap: int | None = None,
    timeout_s: float = 10.0,
    memory_limit: str = "1GB",
) -> dict[str, Any]:
    """Run one query over `samples` and write its result; returns rows, truncated, seconds."""
    if format not in FORMATS:
        raise ValueError(f"--format: unknown {format!r}; expected one of {FORMATS}")
    if format == "parquet" and not out:
        raise ValueError("--format parquet needs --out FILE")
    from curation.catalog import (
        Catalog,
    )  # DuckDB and pyarrow: imported after parsing, so --help answers at once

    kwargs: dict[str, Any] = {"timeout_s": timeout_s, "memory_limit": memory_limit}
    if untrusted and row_cap is not None:
        kwargs["row_cap"] = row_cap
    with Catalog(collection, untrusted=untrusted, **kwargs) as catalog:
        result = catalog.query(query, row_cap=row_cap)
    data = format_result(result.table, format, max_rows=None if out else 200)
    if out:
        try:
            write_bytes(out, data)
        except OSError as exc:
            raise ValueError(f"--out {out}: cannot write: {exc}") from exc
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    return {
        "rows": result.table.num_rows,
        "truncated": result.truncated,
        "seconds": round(result.seconds, 4),
    }


def check_sandbox() -> dict[str, Any]:
    """Print the OS layers an untrusted query runs under on this machine; returns them."""
    from collection.sandbox import (
        sandbox_layers,
    )  # pyarrow behind it: imported after parsing, so --help answers at once

    layers = sandbox_layers()
    width = max(map(len, layers), default=0)
    for name, entry in layers.items():
        state = "in force" if entry.get("in_force") else "MISSING "
        print(f"{name:<{width}}  {state}  {entry.get('detail')}")
    print(f"{sum(bool(e.get('in_force')) for e in layers.values())}/{len(layers)} layers in force")
    return layers


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m curation.sql",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("collection", nargs="?")
    p.add_argument(
        "query",
        nargs="?",
        help='SQL over table `samples`, e.g. "SELECT language, count(*) FROM samples GROUP BY 1"',
    )
    p.add_argument(
        "--check-sandbox",
        action="store_true",
        help="start a sandboxed worker, print the OS layers in force (and why any is missing)",
    )
    p.add_argument("--format", choices=FORMATS, default="table")
    p.add_argument(
        "--out", default=None, help="write the result here (atomically) instead of stdout"
    )
    p.add_argument(
        "--untrusted", action="store_true", help="run sandboxed, as the UI's query box does"
    )
    p.add_argument(
        "--row-cap",
        type=int,
        default=None,
        help="at most this many rows (untrusted default: 10000)",
    )
    p.add_argument("--timeout", type=float, default=10.0, help="untrusted: seconds a query may run")
    p.add_argument("--memory-limit", default="1GB", help="untrusted: DuckDB memory limit")
    a = p.parse_args(argv)
    setup_logging()
    if a.check_sandbox:
        check_sandbox()
        return
    if a.collection is None or a.query is None:
        p.error("COLLECTION and QUERY are required (or --check-sandbox)")
    try:
        info = sql(
            a.collection,
            a.query,
            a.format,
            a.out,
            a.untrusted,
            a.row_cap,
            a.timeout,
            a.memory_limit,
        )
    except ValueError as exc:  # SqlError and CollectionError included: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if info["truncated"]:
        print(f"note: result cut at {info['rows']} rows (row cap)", file=sys.stderr)
    if a.out:
        print(json.dumps({"out": a.out, **info}))


if __name__ == "__main__":
    main()
