"""Stand-ins for `curation.catalog`, `curation.filters` and `curation.takedown` (issue 13, first
half, built on another branch at the same time), with exactly the signatures that branch builds.

`install()` puts a stand-in into `sys.modules` only for a module that does not exist, so once
the real modules land these are inert (then delete this file and its `install()` calls).
Never imported by library code.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
import types
from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation import schema as S
from indices.store import CollectionError, complete_parts


class SqlError(ValueError):
    pass


@dataclass
class SqlResult:
    table: pa.Table
    truncated: bool
    seconds: float


class Catalog:
    """DuckDB over the metadata parts; `samples` has every column plus the global id."""

    def __init__(self, collection: str, untrusted: bool = False, row_cap: int | None = 10_000,
                 timeout_s: float = 10.0, memory_limit: str = "1GB") -> None:
        self.row_cap = row_cap
        layout = S.CollectionLayout(collection)
        try:
            parts = complete_parts(collection)
        except CollectionError as exc:
            raise SqlError(str(exc)) from exc
        selects, offset = [], 0
        for n in parts:
            path = layout.metadata(n)
            failed = pq.read_table(path, columns=[S.EMB_ROW])[S.EMB_ROW].null_count
            selects.append(f"SELECT *, CAST({S.EMB_ROW} AS BIGINT) + {offset} AS {S.ID} FROM read_parquet('{path}')")
            offset += pq.read_metadata(path).num_rows - failed
        self.con = duckdb.connect()
        self.con.execute("CREATE VIEW samples AS " + " UNION ALL BY NAME ".join(selects))

    def query(self, sql: str) -> SqlResult:
        start = time.time()
        try:
            table = self.con.sql(sql).to_arrow_table()
        except duckdb.Error as exc:
            raise SqlError(str(exc).splitlines()[0]) from exc
        truncated = self.row_cap is not None and len(table) > self.row_cap
        if truncated:
            table = table.slice(0, self.row_cap)
        return SqlResult(table, truncated, time.time() - start)

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


PRESETS = {"laion": {"clip_similarity": 0.28, "min_width": 0, "min_height": 0, "punsafe": 0.5,
                     "pwatermark": 0.8}}


def render(preset: str = "laion", **overrides) -> str:
    if preset not in PRESETS:
        raise ValueError(f"filters: unknown preset {preset!r}; presets: {sorted(PRESETS)}")
    values = {**PRESETS[preset]}
    for name, value in overrides.items():
        if name not in values:
            raise ValueError(f"filters: unknown filter {name!r}; known: {sorted(values)}")
        values[name] = value
    return (f"status = 'ok' AND clip_similarity >= {values['clip_similarity']} "
            f"AND width >= {values['min_width']} AND height >= {values['min_height']} "
            f"AND coalesce(punsafe, 0) < {values['punsafe']} AND coalesce(pwatermark, 0) < {values['pwatermark']}")


class Takedown:
    def __init__(self, table: pa.Table | None) -> None:
        self.table = table

    def blocked_mask(self, table: pa.Table) -> np.ndarray:
        mask = np.zeros(len(table), dtype=bool)
        if self.table is None:
            return mask
        for col in (S.KEY, S.URL, S.SHA256):
            if col in self.table.column_names and col in table.column_names:
                listed = self.table[col].drop_null()
                mask |= pc.fill_null(pc.is_in(table[col], value_set=listed.combine_chunks()), False).to_numpy(
                    zero_copy_only=False)
        return mask

    def sql_predicate(self) -> str:
        raise NotImplementedError("stand-in")


def load(collection: str) -> Takedown:
    path = S.CollectionLayout(collection).takedown
    return Takedown(pq.read_table(path) if os.path.exists(path) else None)


def install() -> None:
    """Register each stand-in whose real module does not exist yet."""
    modules = {
        "curation.catalog": {"Catalog": Catalog, "SqlError": SqlError, "SqlResult": SqlResult},
        "curation.filters": {"render": render, "PRESETS": PRESETS},
        "curation.takedown": {"load": load, "Takedown": Takedown},
    }
    for name, attrs in modules.items():
        if name in sys.modules or importlib.util.find_spec(name) is not None:
            continue
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module
        setattr(sys.modules["curation"], name.rsplit(".", 1)[1], module)
