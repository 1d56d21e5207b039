"""A SQL result (an Arrow table of any DuckDB type) made safe to show and to download.

The SQL page's result is at most the sandbox's Arrow byte cap, but Arrow bytes are not what a
page spends: a `list()` aggregate became numpy arrays per cell and a struct dicts per cell
(0.24 MiB of Arrow once took +191 MiB in pandas), and some legal values have no pandas or
Python form at all (`DATE 'infinity'`, `TIME '24:00:00'`, UNION values raise). So nothing is
converted before its size is known: `for_display` counts what each row will cost, keeps the
rows that fit both the row and the byte cap, and only then converts them, numbers and
booleans as they are, strings cut to a cell limit, and every other type as its text (DuckDB's
words for dates, times and infinities; nested values, blobs and huge strings cut at the cell
limit). `download` writes CSV or parquet the same way, with a byte cap on the file.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

#: rows the page shows at most (the sandbox's row cap is the catalog's; this is the page's)
MAX_ROWS = 10_000
#: what the shown frame may hold, estimated before converting (UTF-8 text plus per-cell costs)
MAX_BYTES = 32 * 2**20
#: characters of one cell shown at most; a longer value ends in "…"
MAX_CELL_CHARS = 1_000
#: bytes a download may take
MAX_DOWNLOAD_BYTES = 128 * 2**20
#: characters of one cell in a download (nested values and blobs written as text)
MAX_DOWNLOAD_CELL_CHARS = 64 * 2**10
#: cells a download may write as text (each is Python work; parquet keeps nested types as they are)
MAX_DOWNLOAD_TEXT_CELLS = 100_000
#: what a cell costs besides its text: a pandas slot, an object header, an offset
CELL_OVERHEAD = 64
#: deepest nesting written out; deeper values show as "…"
MAX_DEPTH = 16
ELLIPSIS = "…"
#: DuckDB's infinities as Arrow carries them (date32 days, timestamp units)
_DATE_INFINITY = 2**31 - 1
_TIMESTAMP_INFINITY = 2**63 - 1
_PER_SECOND = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}
#: pandas dtypes that keep integers exact and nulls as NA (not floats)
_NULLABLE = {
    pa.int8(): pd.Int8Dtype(),
    pa.int16(): pd.Int16Dtype(),
    pa.int32(): pd.Int32Dtype(),
    pa.int64(): pd.Int64Dtype(),
    pa.uint8(): pd.UInt8Dtype(),
    pa.uint16(): pd.UInt16Dtype(),
    pa.uint32(): pd.UInt32Dtype(),
    pa.uint64(): pd.UInt64Dtype(),
    pa.bool_(): pd.BooleanDtype(),
}


class ResultTooLarge(ValueError):
    """A download that would pass its byte cap; the message says how to make it smaller."""


@dataclass
class Shown:
    """What the page shows of a result: the frame, and what was left out and why."""

    frame: pd.DataFrame
    total_rows: int
    #: "rows" or "bytes" when the frame stops before the result's last row, else None
    cut_by: str | None = None
    #: cells cut at the character limit
    clipped_cells: int = 0
    #: columns shown as text (their type has no faithful pandas form)
    text_columns: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.frame)

    def note(self) -> str:
        """One line for the page: what is shown of the result, empty when all of it is."""
        parts = []
        if self.cut_by:
            cap = "row" if self.cut_by == "rows" else "size"
            parts.append(
                f"showing the first {self.rows:,} of {self.total_rows:,} rows (display {cap} cap)"
            )
        if self.clipped_cells:
            parts.append(f"{self.clipped_cells:,} long values cut at {MAX_CELL_CHARS:,} characters")
        if self.text_columns:
            parts.append("shown as text: " + ", ".join(self.text_columns))
        return "; ".join(parts)


@functools.lru_cache(maxsize=1024)
def _kind(t: pa.DataType) -> str:
    """How a column is converted: 'native' (numbers, booleans), 'string', 'null', or 'text'
    (also how `cell_text` picks its path, once per type)."""
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        return "native"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_null(t):
        return "null"
    return "text"


def _valid_utf8(column: pa.ChunkedArray) -> bool:
    try:
        column.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def for_display(
    table: pa.Table,
    max_rows: int = MAX_ROWS,
    max_bytes: int = MAX_BYTES,
    max_chars: int = MAX_CELL_CHARS,
) -> Shown:
    """The leading rows of `table` that fit `max_rows` and `max_bytes`, as a pandas frame any
    page can draw. The cost of every row is known before anything is converted: fixed for
    numbers, the UTF-8 length (cut at `max_chars`) for strings, and the rendered text for
    every other type, rendered row by row until the byte cap is reached."""
    total = table.num_rows
    n = min(total, max(0, int(max_rows)))
    cut_by = "rows" if n < total else None
    table = table.slice(0, n)
    kinds = [_kind(f.type) for f in table.schema]
    for i, kind in enumerate(kinds):  # a string column with broken UTF-8 is shown as text
        if kind == "string" and not _valid_utf8(table.column(i)):
            kinds[i] = "text"
    cost = np.full(n, 0, dtype=np.int64)
    for i, kind in enumerate(kinds):
        if kind == "string":
            length = pc.binary_length(table.column(i)).to_numpy(zero_copy_only=False)
            length = np.nan_to_num(np.asarray(length, dtype=np.float64), nan=0.0)
            cost += CELL_OVERHEAD + np.minimum(length, 4 * max_chars).astype(np.int64)
        elif kind != "text":
            cost += CELL_OVERHEAD // 4
    fits = int(np.searchsorted(np.cumsum(cost), max_bytes, side="right"))
    texts, fits = _render_rows(table, kinds, cost, fits, max_bytes, max_chars)
    if fits < n:
        cut_by = "bytes"
    shown = table.slice(0, fits)
    columns, clipped = {}, 0
    names = _unique_names(table.column_names)
    for i, (name, kind) in enumerate(zip(names, kinds)):
        if kind == "text":
            values, cut = texts[i]
            columns[name] = pd.Series(values[:fits], dtype=object)
            clipped += cut
        elif kind == "string":
            col = shown.column(i)
            clipped += int(pc.sum(pc.greater(pc.utf8_length(col), max_chars)).as_py() or 0)
            columns[name] = pc.utf8_slice_codeunits(col, 0, max_chars).to_pandas()
        elif kind == "null":
            columns[name] = pd.Series([None] * fits, dtype=object)
        else:
            col = shown.column(i)
            if pa.types.is_float16(col.type):
                col = col.cast(pa.float32())
            columns[name] = col.to_pandas(types_mapper=_NULLABLE.get)
    frame = pd.DataFrame(columns, index=pd.RangeIndex(fits))
    text_columns = [n for n, k in zip(names, kinds) if k == "text"]
    return Shown(frame, total, cut_by, clipped, text_columns)


def _render_rows(
    table: pa.Table,
    kinds: list[str],
    cost: np.ndarray,
    fits: int,
    max_bytes: int,
    max_chars: int,
) -> tuple[dict[int, tuple[list[str | None], int]], int]:
    """The text of every 'text' column for the rows that fit, rendered row by row while the
    rows' running cost (fixed columns plus text) stays within `max_bytes`; returns
    ({column: (texts, cells cut)}, rows that fit)."""
    text_cols = [i for i, k in enumerate(kinds) if k == "text"]
    texts: dict[int, list[str | None]] = {i: [] for i in text_cols}
    cuts = dict.fromkeys(text_cols, 0)
    if text_cols:
        iters = [_scalars(table.column(i)) for i in text_cols]
        before = np.concatenate([[0], np.cumsum(cost)])  # the other columns' cost of rows < r
        spent = 0
        for row in range(fits):
            cells = []
            for it in iters:
                value = next(it)
                text, cut = cell_text(value, max_chars) if value.is_valid else (None, False)
                cells.append((text, cut))
            row_cost = sum(
                CELL_OVERHEAD // 4
                if t is None
                else CELL_OVERHEAD + len(t.encode("utf-8", "replace"))
                for t, _ in cells
            )
            if before[row + 1] + spent + row_cost > max_bytes:
                fits = row
                break
            spent += row_cost
            for i, (text, cut) in zip(text_cols, cells):
                texts[i].append(text)
                cuts[i] += int(cut)
    return {i: (texts[i], cuts[i]) for i in text_cols}, fits


def _scalars(column: pa.ChunkedArray) -> Iterator[pa.Scalar]:
    for chunk in column.chunks:
        yield from chunk


def _unique_names(names: list[str]) -> list[str]:
    """Column names made unique for pandas ('a', 'a (2)'): SQL may return the same name twice."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return out


# ---- one value as text ------------------------------------------------------------------
class _Text:
    """Text written up to a character budget; `cut` says whether anything did not fit."""

    def __init__(self, limit: int) -> None:
        self.parts: list[str] = []
        self.room = limit
        self.cut = False

    def put(self, text: str) -> None:
        if len(text) > self.room:
            text, self.cut = text[: self.room], True
        if text:
            self.parts.append(text)
            self.room -= len(text)

    @property
    def full(self) -> bool:
        return self.room <= 0


def cell_text(value: pa.Scalar, max_chars: int = MAX_CELL_CHARS) -> tuple[str, bool]:
    """(the value as text of at most `max_chars` characters plus "…", whether it was cut).
    Works on every Arrow type DuckDB returns, whatever the value: work and memory follow
    `max_chars`, not the value's size (a list of a million items writes its first few)."""
    out = _Text(max(1, int(max_chars)))
    _write(value, out, 0, nested=False)
    text = "".join(out.parts)
    return (text + ELLIPSIS, True) if out.cut else (text, False)


def _write(value: pa.Scalar, out: _Text, depth: int, nested: bool) -> None:
    if out.full:
        out.cut = True
        return
    if not value.is_valid:
        out.put("NULL")
        return
    t = value.type
    kind = _kind(t)
    if kind == "native":
        plain = value.as_py()
        out.put(repr(plain) if isinstance(plain, float) else str(plain))
    elif kind == "string":
        data = value.as_buffer()
        limit = 4 * out.room + 4  # enough UTF-8 bytes for the characters that still fit
        head = data[:limit].to_pybytes().decode("utf-8", "replace")
        out.put(f"'{head}'" if nested else head)
        out.cut = out.cut or len(data) > limit
    elif depth > MAX_DEPTH:
        out.put(ELLIPSIS)
        out.cut = True
    elif isinstance(value, pa.ExtensionScalar):
        _write(value.value, out, depth, nested)
    elif pa.types.is_dictionary(t) or pa.types.is_union(t):
        _write(value.value, out, depth, nested)
    elif pa.types.is_map(t):
        _write_items(((kv[0], kv[1]) for kv in value.values), out, depth, "{}", "=")
    elif _is_list(t):
        _write_items(((None, v) for v in value.values), out, depth, "[]", "")
    elif pa.types.is_struct(t):
        fields = ((t.field(i).name, value[i]) for i in range(t.num_fields))
        _write_items(fields, out, depth, "{}", ": ")
    elif _is_binary(t):
        _write_bytes(value.as_buffer(), out)
    else:
        out.put(_scalar_text(value))


def _write_items(items: Any, out: _Text, depth: int, brackets: str, sep: str) -> None:
    """A list, map or struct: items written until the budget runs out."""
    out.put(brackets[0])
    for n, (name, item) in enumerate(items):
        if out.full:
            out.cut = True
            return
        if n:
            out.put(", ")
        if name is not None:
            if isinstance(name, pa.Scalar):
                _write(name, out, depth + 1, nested=True)
                out.put(sep)
            else:
                out.put(f"'{name}'{sep}")
        _write(item, out, depth + 1, nested=True)
    out.put(brackets[1])


def _write_bytes(data: pa.Buffer, out: _Text) -> None:
    """Bytes as DuckDB writes a BLOB: printable ASCII as is, every other byte as \\xHH."""
    head = data[: out.room].to_pybytes()
    out.put("".join(chr(b) if 32 <= b < 127 and b != 92 else f"\\x{b:02X}" for b in head))
    if len(data) > len(head):
        out.cut = True


def _is_list(t: pa.DataType) -> bool:
    return (
        pa.types.is_list(t)
        or pa.types.is_large_list(t)
        or pa.types.is_fixed_size_list(t)
        or pa.types.is_list_view(t)
        or pa.types.is_large_list_view(t)
    )


def _is_binary(t: pa.DataType) -> bool:
    return (
        pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_fixed_size_binary(t)
        or pa.types.is_binary_view(t)
    )


def _scalar_text(value: pa.Scalar) -> str:
    """A primitive value in DuckDB's words: dates and times from their integers (any range,
    24:00:00 and the infinities included), everything else through Python."""
    t = value.type
    try:
        if pa.types.is_date32(t):
            return _date_text(value.cast(pa.int32()).as_py())
        if pa.types.is_date64(t):
            return _date_text(value.cast(pa.int64()).as_py() // 86_400_000)
        if pa.types.is_timestamp(t):
            text = _timestamp_text(value.cast(pa.int64()).as_py(), t.unit)
            return f"{text} UTC" if t.tz and "infinity" not in text else text
        if pa.types.is_time(t):
            return _time_text(value.cast(pa.int64()).as_py(), t.unit)
        if pa.types.is_duration(t):
            return f"{value.cast(pa.int64()).as_py()} {t.unit}"
        if pa.types.is_interval(t):
            months, days, nanos = value.as_py()
            return f"{months} months {days} days {_time_text(nanos, 'ns')}"
        plain = value.as_py()
    except (pa.ArrowException, ValueError, OverflowError, TypeError) as exc:
        return f"<{t}: {type(exc).__name__}>"
    if isinstance(plain, float):
        return repr(plain)
    return str(plain)


def _date_text(days: int) -> str:
    """Days since 1970-01-01 as DuckDB writes a DATE (years before 1 as '(BC)')."""
    if days == _DATE_INFINITY:
        return "infinity"
    if days == -_DATE_INFINITY:
        return "-infinity"
    year, month, day = _civil(days)
    if year <= 0:
        return f"{1 - year:04d}-{month:02d}-{day:02d} (BC)"
    return f"{year:04d}-{month:02d}-{day:02d}"


def _civil(days: int) -> tuple[int, int, int]:
    """(year, month, day) of a day count from 1970-01-01, proleptic Gregorian, any range
    (Howard Hinnant's civil_from_days)."""
    z = days + 719_468
    era = z // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (month <= 2), month, day


def _time_text(value: int, unit: str) -> str:
    """A time of day (or a span) in `unit`s as HH:MM:SS[.fraction]; 24:00:00 stays 24:00:00."""
    per = _PER_SECOND[unit]
    sign = "-" if value < 0 else ""
    seconds, frac = divmod(abs(value), per)
    minutes, sec = divmod(seconds, 60)
    hours, minute = divmod(minutes, 60)
    text = f"{sign}{hours:02d}:{minute:02d}:{sec:02d}"
    if frac:
        digits = len(str(per)) - 1
        text += "." + f"{frac:0{digits}d}".rstrip("0")
    return text


def _timestamp_text(value: int, unit: str) -> str:
    if value == _TIMESTAMP_INFINITY:
        return "infinity"
    if value == -_TIMESTAMP_INFINITY:
        return "-infinity"
    days, rest = divmod(value, 86_400 * _PER_SECOND[unit])
    return f"{_date_text(days)} {_time_text(rest, unit)}"


# ---- downloads --------------------------------------------------------------------------
class _Capped(io.RawIOBase):
    """A byte sink that keeps at most `cap` bytes and remembers whether more came."""

    def __init__(self, cap: int) -> None:
        self.cap, self.buf, self.over = cap, bytearray(), False

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        n = len(data)
        if self.over or len(self.buf) + n > self.cap:
            self.over = True
        else:
            self.buf += bytes(data)
        return n


def _portable(table: pa.Table, keep: Any, max_chars: int, fmt: str) -> pa.Table:
    """`table` with every column `keep(type)` refuses written as text (at most `max_chars`
    characters per cell); ResultTooLarge before any work when that is over
    MAX_DOWNLOAD_TEXT_CELLS cells."""
    text_cells = table.num_rows * sum(not keep(f.type) for f in table.schema)
    if text_cells > MAX_DOWNLOAD_TEXT_CELLS:
        raise ResultTooLarge(
            f"the {fmt} file would need {text_cells:,} values written as text (at most "
            f"{MAX_DOWNLOAD_TEXT_CELLS:,}); download parquet, or select fewer rows or columns"
        )
    columns = []
    for col in table.columns:
        if keep(col.type):
            columns.append(col)
        else:
            columns.append(
                pa.array(
                    [cell_text(v, max_chars)[0] if v.is_valid else None for v in _scalars(col)],
                    pa.string(),
                )
            )
    return pa.Table.from_arrays(columns, names=table.column_names)


def _csv_ok(t: pa.DataType) -> bool:
    return _kind(t) in ("native", "string", "null") or pa.types.is_decimal(t)


def _parquet_ok(t: pa.DataType) -> bool:
    if pa.types.is_union(t) or isinstance(t, pa.ExtensionType) or pa.types.is_dictionary(t):
        return False
    if pa.types.is_time(t) or pa.types.is_interval(t) or pa.types.is_duration(t):
        return False  # 24:00:00 and intervals have no parquet form that reads back the same
    return all(_parquet_ok(t.field(i).type) for i in range(t.num_fields))


def download(
    table: pa.Table,
    fmt: str,
    max_bytes: int = MAX_DOWNLOAD_BYTES,
    max_chars: int = MAX_DOWNLOAD_CELL_CHARS,
) -> bytes:
    """The result as a CSV or parquet file; columns the format cannot hold are written as
    their text. ResultTooLarge when the file would pass `max_bytes` (memory stays bounded by
    it: the writer's output is never kept past the cap)."""
    if fmt not in ("csv", "parquet"):
        raise ValueError(f"download format: unknown {fmt!r}; expected csv or parquet")
    sink = _Capped(max_bytes)
    if fmt == "csv":
        pacsv.write_csv(_portable(table, _csv_ok, max_chars, fmt), sink)
    else:
        pq.write_table(_portable(table, _parquet_ok, max_chars, fmt), sink)
    if sink.over:
        raise ResultTooLarge(
            f"the {fmt} file would be over {max_bytes // 2**20} MiB; select fewer rows or columns"
        )
    return bytes(sink.buf)
