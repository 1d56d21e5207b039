"""The takedown list of a collection: `COLLECTION/takedown.parquet`, read, matched and rewritten.

The file holds one entry per row: exactly one of `key`, `url` or `sha256`,
with a `reason` and the UTC time it was `added`. A listed item never leaves Sieve again: search
and the server drop it (the server re-reads a changed list within seconds), untrusted SQL never
sees it and export re-checks it. The file is rewritten atomically on every change. The command
over it is `python -m curation.takedown`.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from collection import schema as S
from collection.storage import url_to_fs, write_bytes

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SCHEMA = pa.schema(
    [
        (S.KEY, pa.string()),
        (S.URL, pa.string()),
        (S.SHA256, pa.string()),
        (S.TAKEDOWN_REASON, pa.string()),
        (S.TAKEDOWN_ADDED, pa.timestamp("s", tz="UTC")),
    ]
)


class TakedownError(ValueError):
    """A takedown file or entry that cannot be used; the message names the file, line or value."""


@dataclass(frozen=True)
class Takedown:
    """The listed keys, urls and sha256s of one collection (empty when it has no list)."""

    keys: frozenset[str] = frozenset()
    urls: frozenset[str] = frozenset()
    sha256: frozenset[str] = frozenset()
    path: str | None = None
    #: (mtime, size, inode) of the file when loaded (None: no file); `TakedownWatch` polls it
    signature: tuple | None = None

    @classmethod
    def load(cls, collection: str) -> "Takedown":
        """The collection's takedown list; empty when there is no takedown.parquet."""
        path = S.CollectionLayout(collection).takedown
        table, signature = _read(path)
        if table is None:
            return cls(path=path)
        sets = {
            c: frozenset(v for v in table.column(c).to_pylist() if v)
            for c in S.TAKEDOWN_MATCH_COLUMNS
        }
        shas = frozenset(
            v.lower() for v in sets[S.SHA256]
        )  # hashes are lower-case hex in the metadata
        return cls(sets[S.KEY], sets[S.URL], shas, path, signature)

    def __len__(self) -> int:
        return len(self.keys) + len(self.urls) + len(self.sha256)

    def _columns(self) -> dict[str, frozenset[str]]:
        return {S.KEY: self.keys, S.URL: self.urls, S.SHA256: self.sha256}

    def blocked_mask(self, rows: pa.Table | pd.DataFrame) -> np.ndarray:
        """Per row: whether its key, url or sha256 is listed (columns the rows lack match nothing)."""
        n = rows.num_rows if isinstance(rows, pa.Table) else len(rows)
        mask = np.zeros(n, dtype=bool)
        names = rows.column_names if isinstance(rows, pa.Table) else list(rows.columns)
        for col, values in self._columns().items():
            if not values or col not in names:
                continue
            if isinstance(rows, pa.Table):
                hit = pc.is_in(
                    rows.column(col).cast(pa.string()),
                    value_set=pa.array(sorted(values), pa.string()),
                )
                mask |= hit.fill_null(False).to_numpy(zero_copy_only=False)
            else:
                mask |= rows[col].isin(values).to_numpy(dtype=bool)
        return mask

    def sql_predicate(self) -> str:
        """A DuckDB WHERE fragment true for rows that are NOT listed ('TRUE' for an empty list)."""
        clauses = []
        for col, values in self._columns().items():
            if values:
                listed = ", ".join(_sql_string(v) for v in sorted(values))
                clauses.append(f"({col} IS NULL OR {col} NOT IN ({listed}))")
        return " AND ".join(clauses) or "TRUE"

    def arrow_filter(self, columns: Iterable[str]) -> pc.Expression | None:
        """A pyarrow dataset filter keeping rows that are not listed, over the given columns
        (None when nothing could match): what the untrusted SQL worker scans through."""
        names = set(columns)
        keep = None
        for col, values in self._columns().items():
            if values and col in names:
                term = (
                    ~pc.field(col).isin(pa.array(sorted(values), pa.string()))
                    | pc.field(col).is_null()
                )
                keep = term if keep is None else keep & term
        return keep


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _signature(path: str) -> tuple | None:
    """What changes whenever the file is rewritten (an atomic rewrite is a new inode), or None."""
    fs, p = url_to_fs(path)
    try:
        info = fs.info(p)
    except FileNotFoundError:
        return None
    mtime = info.get("mtime")
    mtime = mtime.timestamp() if isinstance(mtime, dt.datetime) else mtime
    return (mtime, info.get("size"), info.get("ino"))


class TakedownWatch:
    """A collection's takedown list, re-read when the file changes, checked at most once per
    `interval` seconds: how long-lived readers (the server, a UI's catalog) pick up changes."""

    def __init__(self, collection: str, interval: float = 1.0) -> None:
        self.collection, self.interval = collection, interval
        self._lock = threading.Lock()
        self.takedown = Takedown.load(collection)
        self._checked = time.monotonic()

    def poll(self) -> tuple[Takedown, bool]:
        """(the current list, whether it changed since the last poll)."""
        with self._lock:
            now = time.monotonic()
            if now - self._checked < self.interval:
                return self.takedown, False
            self._checked = now
            if _signature(S.CollectionLayout(self.collection).takedown) == self.takedown.signature:
                return self.takedown, False
            self.takedown = Takedown.load(self.collection)
            log.info("%s: takedown list changed: %d entries", self.collection, len(self.takedown))
            return self.takedown, True


def _read(path: str) -> tuple[pa.Table | None, tuple | None]:
    """(entries with every takedown column, file signature), or (None, None) when there is no file."""
    fs, p = url_to_fs(path)
    signature = _signature(path)
    if signature is None:
        return None, None
    try:
        with fs.open(p, "rb") as fh:
            table = pq.read_table(fh)
    except (OSError, pa.ArrowInvalid) as exc:
        raise TakedownError(f"{path}: not a readable parquet file: {exc}") from exc
    if not set(S.TAKEDOWN_MATCH_COLUMNS) & set(table.column_names):
        raise TakedownError(
            f"{path}: needs at least one of the columns {list(S.TAKEDOWN_MATCH_COLUMNS)}, "
            f"has {table.column_names}"
        )
    cols = []
    for f in _SCHEMA:
        if f.name in table.column_names:
            try:
                cols.append(table.column(f.name).cast(f.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise TakedownError(f"{path}: column {f.name!r} is not {f.type}: {exc}") from exc
        else:
            cols.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=_SCHEMA), signature


def list_entries(collection: str) -> pa.Table:
    """Every entry of the collection's list (key, url, sha256, reason, added); empty when none."""
    table, _ = _read(S.CollectionLayout(collection).takedown)
    return table if table is not None else _SCHEMA.empty_table()


def _normalise(column: str, value: Any) -> str:
    text = str(value).strip() if value is not None else ""
    if not text:
        raise TakedownError(f"takedown {column}: empty value")
    if column == S.SHA256:
        text = text.lower()
        if not _SHA256.match(text):
            raise TakedownError(f"takedown sha256 {value!r}: expected 64 hex digits")
    return text


def make_entries(
    keys: Sequence[str], urls: Sequence[str], sha256: Sequence[str], reason: str | None = None
) -> list[tuple[str, str, str | None]]:
    """(column, value, reason) per entry, values checked and normalised."""
    return [
        (col, _normalise(col, v), reason)
        for col, values in ((S.KEY, keys), (S.URL, urls), (S.SHA256, sha256))
        for v in values
    ]


def check_collection(collection: str) -> S.CollectionLayout:
    layout = S.CollectionLayout(collection)
    fs, _ = url_to_fs(collection)
    if not (
        fs.exists(url_to_fs(layout.done_dir)[1]) or fs.exists(url_to_fs(layout.collection_json)[1])
    ):
        raise TakedownError(f"{collection}: not a collection (no _done/ or collection.json)")
    return layout


def _write(layout: S.CollectionLayout, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    try:
        write_bytes(layout.takedown, buf.getvalue())
    except OSError as exc:
        raise TakedownError(f"{layout.takedown}: cannot write the takedown list: {exc}") from exc


def add_entries(collection: str, entries: Sequence[tuple[str, str, str | None]]) -> int:
    """List (column, value, reason) entries; ones already listed keep their reason and date.
    Returns how many were new. One atomic rewrite of takedown.parquet."""
    layout = check_collection(collection)
    current = list_entries(collection)
    seen = {(c, v) for c in S.TAKEDOWN_MATCH_COLUMNS for v in current.column(c).to_pylist() if v}
    new = []
    for col, value, why in entries:
        if (col, value) not in seen:
            seen.add((col, value))
            new.append((col, value, why))
    if not new:
        return 0
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    rows = pa.Table.from_pylist(
        [
            {
                S.KEY: v if c == S.KEY else None,
                S.URL: v if c == S.URL else None,
                S.SHA256: v if c == S.SHA256 else None,
                S.TAKEDOWN_REASON: why or None,
                S.TAKEDOWN_ADDED: now,
            }
            for c, v, why in new
        ],
        schema=_SCHEMA,
    )
    _write(layout, pa.concat_tables([current, rows]))
    log.info(
        "%s: listed %d new entries (%d in all)",
        layout.takedown,
        len(new),
        current.num_rows + len(new),
    )
    return len(new)


def add(
    collection: str,
    keys: Sequence[str] = (),
    urls: Sequence[str] = (),
    sha256: Sequence[str] = (),
    reason: str = "",
) -> int:
    """List these keys / urls / sha256s with one reason; returns how many were new."""
    return add_entries(collection, make_entries(keys, urls, sha256, reason or None))


def remove(
    collection: str, keys: Sequence[str] = (), urls: Sequence[str] = (), sha256: Sequence[str] = ()
) -> int:
    """Unlist these keys / urls / sha256s; returns how many entries were removed."""
    layout = check_collection(collection)
    current = list_entries(collection)
    drop = np.zeros(current.num_rows, dtype=bool)
    for col, value, _ in make_entries(keys, urls, sha256):
        drop |= pc.equal(current.column(col), value).fill_null(False).to_numpy(zero_copy_only=False)
    if drop.any():
        _write(layout, current.filter(pa.array(~drop)))
        log.info("%s: removed %d entries", layout.takedown, int(drop.sum()))
    return int(drop.sum())


def read_entry_file(path: str, reason: str | None = None) -> list[tuple[str, str, str | None]]:
    """(column, value, reason) entries of a --file (formats in the module docstring); a row's own
    `reason` column wins over `reason`."""
    if not os.path.exists(path):
        raise TakedownError(f"{path}: no such file")
    if not path.endswith((".parquet", ".csv")):
        out = []
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, start=1):
                text = line.strip()
                if not text or text.startswith("#"):
                    continue
                col = S.URL if "://" in text else S.SHA256 if _SHA256.match(text.lower()) else S.KEY
                try:
                    out.append((col, _normalise(col, text), reason))
                except TakedownError as exc:
                    raise TakedownError(f"{path}:{n}: {exc}") from None
        return out
    try:
        if path.endswith(".parquet"):
            table = pq.read_table(path)
        else:  # every value as text: keys such as 000123 are not numbers
            table = pacsv.read_csv(
                path,
                convert_options=pacsv.ConvertOptions(
                    column_types={
                        c: pa.string() for c in (*S.TAKEDOWN_MATCH_COLUMNS, S.TAKEDOWN_REASON)
                    }
                ),
            )
    except (OSError, pa.ArrowInvalid) as exc:
        raise TakedownError(f"{path}: unreadable: {exc}") from exc
    cols = [c for c in S.TAKEDOWN_MATCH_COLUMNS if c in table.column_names]
    if not cols:
        raise TakedownError(
            f"{path}: needs a column named one of {list(S.TAKEDOWN_MATCH_COLUMNS)}, "
            f"has {table.column_names}"
        )
    out = []
    first = 2 if path.endswith(".csv") else 0  # a csv's first data row is line 2
    for i, row in enumerate(table.to_pylist(), start=first):
        given = [c for c in cols if row.get(c) not in (None, "")]
        if len(given) != 1:
            raise TakedownError(
                f"{path}: row {i} sets {given or 'none'} of {cols}; set exactly one"
            )
        try:
            out.append(
                (
                    given[0],
                    _normalise(given[0], row[given[0]]),
                    row.get(S.TAKEDOWN_REASON) or reason,
                )
            )
        except TakedownError as exc:
            raise TakedownError(f"{path}: row {i}: {exc}") from None
    return out
