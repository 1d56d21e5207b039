"""A collection's complete parts and their metadata, on a local path or any fsspec URL.

A vector's global id is its position in the concatenation of all complete parts in order of
N (docs/design.md), so every reader here walks parts in that order and never loads them all.
"""

from __future__ import annotations

import posixpath
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from collection import schema as S
from collection.storage import REMOTE_ERRORS, TMP_MARK, read_json, url_to_fs


class CollectionError(ValueError):
    """The collection folder is missing a file or field this stage needs."""


def unify_part_schemas(schemas: Sequence[pa.Schema], where: str) -> pa.Schema:
    """One schema over every metadata part's (a column a part lacks is null there); parts that
    disagree on a column's type are a one-line CollectionError naming `where`."""
    try:
        return pa.unify_schemas(list(schemas), promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CollectionError(
            f"{where}: metadata parts disagree on a column's type: {first}"
        ) from None


def complete_parts(root: str) -> list[int]:
    """Part numbers with a `_done` marker, sorted: only those are indexed or served."""
    layout = S.CollectionLayout(root)
    try:
        fs, done = url_to_fs(layout.done_dir)
        fs.invalidate_cache(done)  # a long-lived filesystem's listing cache would hide new parts
        if fs.isfile(url_to_fs(root)[1]):
            raise CollectionError(f"{root}: is a file, not a collection folder")
        names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(done, detail=False)]
    except CollectionError:
        raise
    except FileNotFoundError:
        if not _exists(root):
            raise CollectionError(f"{root}: no such collection folder") from None
        raise CollectionError(
            f"{layout.done_dir}: no _done folder; is {root!r} a collection?"
        ) from None
    except REMOTE_ERRORS as exc:
        raise CollectionError(
            f"{root}: cannot list the collection: {type(exc).__name__}: {exc}"
        ) from None
    parts = []
    for name in names:
        stem, ext = posixpath.splitext(name)
        if ext == ".json" and stem.isdigit():
            parts.append(int(stem))
    if not parts:
        raise CollectionError(f"{layout.done_dir}: no complete parts")
    return sorted(parts)


def _exists(url: str) -> bool:
    """Whether anything is at `url` (False also where the store cannot say)."""
    fs, path = url_to_fs(url)
    try:
        return fs.exists(path)
    except REMOTE_ERRORS:
        return False


def read_part_metadata(
    root: str, n: int, columns: list[str] | None = None, ok_only: bool = False
) -> pa.Table:
    """Part n's metadata parquet: every row, or with `ok_only` the embedded ones in vector order
    (non-null `emb_row`, sorted by it: row i is vector i of the part's embeddings)."""
    path = S.CollectionLayout(root).metadata(n)
    fs, p = url_to_fs(path)
    try:
        table = pq.read_table(p, filesystem=fs, columns=None if ok_only else columns)
    except FileNotFoundError:
        raise CollectionError(f"{path}: missing metadata of part {n}") from None
    except (OSError, pa.ArrowInvalid) as exc:
        raise CollectionError(f"{path}: unreadable metadata part: {exc}") from None
    if ok_only:
        if S.EMB_ROW not in table.column_names:
            raise CollectionError(f"{path}: no {S.EMB_ROW!r} column")
        table = table.filter(pc.is_valid(table[S.EMB_ROW]))
        table = table.take(pc.sort_indices(table, sort_keys=[(S.EMB_ROW, "ascending")]))
        if columns is not None:
            table = table.select([c for c in columns if c in table.column_names])
    return table


def read_metadata(root: str, columns: list[str] | None = None) -> pa.Table:
    """pyarrow Table of the successful rows of every complete part, in global-id order."""
    tables = [read_part_metadata(root, n, columns, ok_only=True) for n in complete_parts(root)]
    return pa.concat_tables(tables, promote_options="default")


def part_offsets(counts: Sequence[int]) -> np.ndarray:
    """The global id of each part's first vector, plus the total: the row ↔ id rule in one place
    (`counts`: each complete part's embedded rows, in order of N)."""
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)


def by_part(offsets: np.ndarray, ids: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Global ids split by the part holding them: for each such part, (its position among the
    complete parts, the positions in `ids` of its ids, their rows within the part, ascending)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    # one sort, then runs of the same part: a scan per part would cost parts x ids, which is
    # most of an exact re-rank's time at 100 parts
    order = np.argsort(ids, kind="stable")
    ordered = ids[order]
    which = np.searchsorted(offsets, ordered, side="right") - 1
    cuts = np.flatnonzero(which[1:] != which[:-1]) + 1
    for start, stop in zip(np.r_[0, cuts], np.r_[cuts, len(ids)]):
        if stop > start:
            p = int(which[start])
            yield p, order[start:stop], ordered[start:stop] - offsets[p]


def missing_parts(root: str) -> list[str]:
    """What makes the collection's parts incomplete, one phrase each ([] when nothing): parts
    with metadata but no `_done` marker (an embed run cut short), and fewer complete parts than
    collection.json counts (parts deleted since). A stage that reads every part checks this
    first, so it never quietly works on part of a collection."""
    done = set(complete_parts(root))
    layout = S.CollectionLayout(root)
    fs, meta_dir = url_to_fs(posixpath.dirname(layout.metadata(0)))
    try:
        names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(meta_dir, detail=False)]
    except FileNotFoundError:
        names = []
    written = set()
    for name in names:
        stem = posixpath.splitext(name)[0]
        number = stem.rsplit("_", 1)[-1]
        if name.endswith(".parquet") and number.isdigit() and TMP_MARK not in name:
            written.add(int(number))
    problems = []
    unfinished = sorted(written - done)
    if unfinished:
        shown = ", ".join(str(n) for n in unfinished[:5]) + (", ..." if len(unfinished) > 5 else "")
        problems.append(f"part(s) {shown} have metadata but no _done marker")
    counted = read_json(layout.collection_json, missing={}).get("parts")
    if isinstance(counted, int) and len(done) < counted:
        problems.append(f"{len(done)} complete part(s) where collection.json counts {counted}")
    return problems
