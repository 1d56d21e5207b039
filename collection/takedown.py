"""The takedown list of a collection: `COLLECTION/takedown.parquet`, read, matched and rewritten.

The file holds one entry per row: exactly one of `key`, `url` or `sha256`,
with a `reason` and the UTC time it was `added`. A listed item never leaves Sieve again: search
and the server drop it (a long-lived reader checks the file for a change on every request, so a
listing applies from the next one), untrusted SQL never sees it and export re-checks it. sha256
values match in any case. The file is rewritten atomically on every change, under a file lock
so that concurrent `add` and `remove` calls each see the other's entries. The command over it
is `python -m curation.takedown`.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import os
import re
import threading
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from collection import schema as S
from collection.storage import file_lock, file_signature, url_to_fs, write_bytes

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
    #: what `collection.storage.file_signature` said of the file when loaded (None: no file);
    #: `TakedownWatch` polls it
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

    @cached_property
    def _value_sets(self) -> dict[str, pa.Array]:
        """Each non-empty column's listed values as one Arrow array, built once per load."""
        return {c: pa.array(sorted(v), pa.string()) for c, v in self._columns().items() if v}

    def listed(self, column: str, values: pa.Array | pa.ChunkedArray | pd.Series) -> np.ndarray:
        """Per value of a key / url / sha256 column: whether the list names it (sha256 in any
        case; nulls never match). The one matching rule every reader of the list uses."""
        n = len(values)
        value_set = self._value_sets.get(column)
        if value_set is None or n == 0:
            return np.zeros(n, dtype=bool)
        if isinstance(values, pd.Series):
            values = pa.Array.from_pandas(values.astype(object))
        values = pc.cast(values, pa.string())
        if column == S.SHA256:
            values = pc.utf8_lower(values)
        hit = pc.is_in(values, value_set=value_set)
        return np.asarray(hit.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)

    def blocked_mask(self, rows: pa.Table | pd.DataFrame) -> np.ndarray:
        """Per row: whether its key, url or sha256 is listed (a column the rows lack matches
        nothing)."""
        n = rows.num_rows if isinstance(rows, pa.Table) else len(rows)
        mask = np.zeros(n, dtype=bool)
        names = rows.column_names if isinstance(rows, pa.Table) else list(rows.columns)
        for col in S.TAKEDOWN_MATCH_COLUMNS:
            if col in names:
                mask |= self.listed(
                    col, rows.column(col) if isinstance(rows, pa.Table) else rows[col]
                )
        return mask

    def sql_predicate(self) -> str:
        """A DuckDB WHERE fragment true for rows that are NOT listed ('TRUE' for an empty list)."""
        clauses = []
        for col, values in self._columns().items():
            if values:
                listed = ", ".join(_sql_string(v) for v in sorted(values))
                value = f"lower({col})" if col == S.SHA256 else col
                clauses.append(f"({col} IS NULL OR {value} NOT IN ({listed}))")
        return " AND ".join(clauses) or "TRUE"

    def arrow_filter(self, columns: Iterable[str]) -> pc.Expression | None:
        """A pyarrow dataset filter keeping rows that are not listed, over the given columns
        (None when nothing could match): what the untrusted SQL worker scans through."""
        names = set(columns)
        keep = None
        for col, value_set in self._value_sets.items():
            if col in names:
                value = pc.utf8_lower(pc.field(col)) if col == S.SHA256 else pc.field(col)
                term = ~value.isin(value_set) | pc.field(col).is_null()
                keep = term if keep is None else keep & term
        return keep


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


#: what an object store's `info` says that changes when an object is rewritten
def list_signature(collection: str) -> tuple | None:
    """The takedown file's change signature now (None: no list): what a caller that keeps an
    answer compares to know whether the list changed since the answer was made."""
    return file_signature(S.CollectionLayout(collection).takedown)


class TakedownWatch:
    """A collection's takedown list, re-read when the file changes: how long-lived readers (the
    server, a UI's catalog) pick up changes. Every poll compares the file's signature (one stat
    locally), so a listing applies from the very next request."""

    def __init__(self, collection: str) -> None:
        self.collection = collection
        self._lock = threading.Lock()
        self.takedown = Takedown.load(collection)

    def poll(self) -> tuple[Takedown, bool]:
        """(the current list, whether it changed since the last poll)."""
        with self._lock:
            if list_signature(self.collection) == self.takedown.signature:
                return self.takedown, False
            self.takedown = Takedown.load(self.collection)
            log.info("%s: takedown list changed: %d entries", self.collection, len(self.takedown))
            return self.takedown, True


def _read(path: str) -> tuple[pa.Table | None, tuple | None]:
    """(entries with every takedown column, file signature); (None, None) when there is no
    file."""
    fs, p = url_to_fs(path)
    signature = file_signature(path)
    if signature is None:
        return None, None
    try:
        with fs.open(p, "rb") as fh:
            # one thread: the list is small, and a process that reads it and exits at once
            # could abort in Arrow's pool ("terminate called without an active exception")
            table = pq.read_table(fh, use_threads=False, pre_buffer=False)
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


def _same(column: str, value: str) -> str:
    """A listed value as matching compares it (sha256 in lower case)."""
    return value.lower() if column == S.SHA256 else value


def add_entries(collection: str, entries: Sequence[tuple[str, str, str | None]]) -> int:
    """List (column, value, reason) entries; ones already listed keep their reason and date.
    Returns how many were new. One atomic rewrite of takedown.parquet, under the list's file
    lock: a concurrent add or remove waits, then reads what this one wrote."""
    layout = check_collection(collection)
    with file_lock(layout.takedown):
        return _add_locked(collection, layout, entries)


def _add_locked(
    collection: str, layout: S.CollectionLayout, entries: Sequence[tuple[str, str, str | None]]
) -> int:
    current = list_entries(collection)
    seen = {
        (c, _same(c, v))
        for c in S.TAKEDOWN_MATCH_COLUMNS
        for v in current.column(c).to_pylist()
        if v
    }
    new = []
    for col, value, why in entries:
        if (col, _same(col, value)) not in seen:
            seen.add((col, _same(col, value)))
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
    """Unlist these keys / urls / sha256s (sha256 in any case); returns how many entries were
    removed. Under the list's file lock, as `add_entries`."""
    layout = check_collection(collection)
    unlist = Takedown(*(frozenset(v) for v in _by_column(make_entries(keys, urls, sha256))))
    with file_lock(layout.takedown):
        current = list_entries(collection)
        drop = unlist.blocked_mask(current)
        if drop.any():
            _write(layout, current.filter(pa.array(~drop)))
            log.info("%s: removed %d entries", layout.takedown, int(drop.sum()))
    return int(drop.sum())


def _by_column(entries: Sequence[tuple[str, str, str | None]]) -> tuple[list[str], ...]:
    """(keys, urls, sha256s) of (column, value, reason) entries."""
    return tuple([v for c, v, _ in entries if c == col] for col in S.TAKEDOWN_MATCH_COLUMNS)


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
