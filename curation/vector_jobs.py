"""The task life cycle the vector stages share (SemDeDup, uniqueness, the map): one task per part
or cluster group reads its own inputs and writes its own parquet, then a marker; the driver only
plans, skips tasks whose marker matches the run, and joins the outputs with DuckDB.

A marker is written last and holds the run's parameters, so a killed run started again redoes
only the tasks without one, and a run with other parameters (or parts) redoes them all. Tasks
run on Dask (`collection.cluster`: a LocalCluster on 127.0.0.1 or a `--scheduler` address) or,
with `workers=0`, in this process; either way every task computes the same thing, so the output
does not depend on where or in which order they ran.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from collection import schema as S
from collection.parts import CollectionError, complete_parts, read_part_metadata
from collection.storage import (
    REMOTE_ERRORS,
    atomic_open,
    is_local,
    read_json,
    url_to_fs,
    write_bytes,
    write_json,
)
from models.runtime import cores, progress

log = logging.getLogger(__name__)

#: DuckDB's memory for the driver's joins and sorts: beyond it, it spills to a temporary folder
DUCKDB_MEMORY = "1GB"
#: rows per record batch streamed from DuckDB into the output parquet
STREAM_ROWS = 1 << 17


def normal(params: dict[str, Any]) -> dict[str, Any]:
    """Parameters as they read back from JSON (tuples become lists), so markers compare equal."""
    return json.loads(json.dumps(params, sort_keys=True, default=str))


@dataclass(frozen=True)
class TaskFolder:
    """A run's task outputs (`{name}.parquet`) and markers (`{name}.done.json`) in one folder."""

    url: str
    params: dict[str, Any]

    def output(self, name: str) -> str:
        return posixpath.join(self.url, f"{name}.parquet")

    def marker(self, name: str) -> str:
        return posixpath.join(self.url, f"{name}.done.json")

    def result(self, name: str) -> Any:
        """A finished task's result, or None when it has no marker for these parameters."""
        doc = read_json(self.marker(name))
        if isinstance(doc, dict) and doc.get("params") == self.params:
            return doc.get("result")
        return None

    def write(self, name: str, table: pa.Table, row_groups: Sequence[int] = ()) -> None:
        """A task's output table, written atomically; `row_groups`: the rows where row groups
        begin, so that a reader can take one slice by the row groups' statistics."""
        buf = io.BytesIO()
        if not row_groups:
            pq.write_table(table, buf)
        else:
            with pq.ParquetWriter(buf, table.schema) as writer:
                ends = [*row_groups[1:], table.num_rows]
                for lo, hi in zip(row_groups, ends):
                    if hi > lo:
                        writer.write_table(table.slice(lo, hi - lo))
        write_bytes(self.output(name), buf.getvalue())

    def finish(self, name: str, result: Any) -> Any:
        """The marker, written last: the task is complete."""
        write_json(self.marker(name), {"params": self.params, "result": result})
        return result

    def remove(self) -> None:
        """The whole folder (once its outputs are joined into the stage's file)."""
        fs, path = url_to_fs(self.url)
        try:
            if fs.exists(path):
                fs.rm(path, recursive=True)
        except (OSError, *REMOTE_ERRORS) as exc:  # the stage's file is written: only a leftover
            log.warning("%s: cannot remove task outputs: %s", self.url, exc)


def task_folder(final_path: str, params: dict[str, Any]) -> TaskFolder:
    """The task folder of the stage whose output is `final_path` (`X.parquet` -> `X_tasks/`)."""
    return TaskFolder(final_path.removesuffix(".parquet") + "_tasks", normal(params))


def run_task(fn: Callable[..., Any], folder: TaskFolder, name: str, *args: Any) -> Any:
    """One task: `fn(folder, name, *args)` writes `folder.output(name)` and returns a small
    JSON-able result; the marker follows."""
    return folder.finish(name, fn(folder, name, *args))


class Runner:
    """Runs tasks on a Dask cluster, or in this process when `workers == 0` and no scheduler."""

    def __init__(self, scheduler: str | None = None, workers: int | None = None) -> None:
        self.session = None
        if scheduler or workers != 0:
            # Dask only when tasks run remotely, so `--workers 0` runs stay light
            from collection.cluster import SINGLE_THREAD_WORKER_ENV, open_cluster

            self.session = open_cluster(
                scheduler, workers or cores(), worker_env=SINGLE_THREAD_WORKER_ENV
            )

    def close(self) -> None:
        if self.session is not None:
            self.session.close()

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(
        self,
        fn: Callable[..., Any],
        folder: TaskFolder,
        names: Sequence[str],
        args: Sequence[tuple],
    ) -> tuple[list[Any], int]:
        """Each task's result in order, and how many ran now (the others had markers)."""
        results = [folder.result(name) for name in names]
        todo = [i for i, r in enumerate(results) if r is None]
        if len(todo) < len(names):
            log.info(
                "%s: %d of %d tasks already done", folder.url, len(names) - len(todo), len(names)
            )
        calls = [(fn, folder, names[i], *args[i]) for i in todo]
        desc = getattr(fn, "__name__", "task")
        with progress(total=len(calls), desc=desc, unit="task", disable=len(calls) < 2) as bar:
            for i, value in zip(todo, self._each(calls, desc)):
                results[i] = value
                bar.update(1)
        return results, len(todo)

    def _each(self, calls: list[tuple], desc: str) -> Iterator[Any]:
        """Results of run_task(*call) in the order of `calls`."""
        if self.session is None:
            for call in calls:
                yield run_task(*call)
            return
        from collection.cluster import each_completed  # beside open_cluster: Dask runs only

        done: dict[int, Any] = {}
        nxt = 0
        for outcome in each_completed(self.session.client, run_task, calls, desc):
            if outcome.error is not None:
                raise outcome.error
            done[outcome.index] = outcome.value
            while nxt in done:
                yield done.pop(nxt)
                nxt += 1


def part_params(collection: str, counts: Sequence[int]) -> dict[str, Any]:
    """What ties task outputs to the collection's parts: their numbers and vector counts."""
    return {"parts": complete_parts(collection), "counts": [int(c) for c in counts]}


def part_keys(collection: str, store: Any, pos: int) -> tuple[int, int, pa.ChunkedArray]:
    """(first global id, rows, keys) of the store's part at `pos`; a CollectionError naming
    the metadata file when its embedded rows and the part's vectors disagree."""
    part, start = store.parts[pos], int(store.offsets[pos])
    rows = int(store.offsets[pos + 1]) - start
    keys = read_part_metadata(collection, part, [S.KEY], ok_only=True).column(S.KEY)
    if len(keys) != rows:
        raise CollectionError(
            f"{S.CollectionLayout(collection).metadata(part)}: {len(keys)} embedded rows but "
            f"{rows} {store.modality} vectors"
        )
    return start, rows, keys


def check_parts(collection: str, modality: str) -> list[int]:
    """The complete parts, each checked for its metadata and `modality` embeddings: a missing file
    is a CollectionError naming it, its part and what to run (before any task starts)."""
    layout = S.CollectionLayout(collection)
    parts = complete_parts(collection)
    for n in parts:
        for what, path in (("metadata", layout.metadata(n)), (modality, layout.emb(modality, n))):
            fs, p = url_to_fs(path)
            if not fs.exists(p):
                raise CollectionError(
                    f"{path}: missing {what} of part {n}, which {layout.done(n)} marks complete; "
                    "remove that marker and run `python -m pipelines.embed` again to remake it"
                )
    return parts


def connect(scratch: str) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with a memory limit, spilling to `scratch`."""
    con = duckdb.connect(":memory:")
    con.execute(f"SET memory_limit = '{DUCKDB_MEMORY}'")
    con.execute(f"SET temp_directory = '{scratch}'")
    con.execute("SET preserve_insertion_order = true")
    con.execute("SET threads = 1")
    return con


def local_files(folder: TaskFolder, names: Sequence[str], scratch: str) -> list[str]:
    """Local paths of the task outputs (remote ones are copied into `scratch` first)."""
    paths = [folder.output(n) for n in names]
    if all(is_local(p) for p in paths):
        return [url_to_fs(p)[1] for p in paths]
    out = []
    for i, p in enumerate(paths):
        fs, fp = url_to_fs(p)
        local = os.path.join(scratch, f"task_{i}.parquet")
        fs.get_file(fp, local)
        out.append(local)
    return out


def stream_query(
    folder: TaskFolder,
    names: Sequence[str],
    sql: Callable[[str], str],
    path: str,
    schema: pa.Schema,
) -> int:
    """Run `sql(files)` in DuckDB over the task outputs (`files`: a SQL list of their paths) and
    stream the rows into the parquet at `path` (atomically, with `schema`); returns the row count.
    The driver holds one record batch at a time."""
    with tempfile.TemporaryDirectory(prefix="sieve-join-") as scratch:
        files = local_files(folder, names, scratch)
        listing = "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"
        con = connect(os.path.join(scratch, "spill"))
        try:
            reader = con.sql(sql(listing)).to_arrow_reader(STREAM_ROWS)
            rows = 0
            with atomic_open(path) as fh, pq.ParquetWriter(fh, schema) as writer:
                for batch in reader:
                    batch = pa.Table.from_batches([batch]).cast(schema)
                    writer.write_table(batch)
                    rows += batch.num_rows
                if rows == 0:
                    writer.write_table(schema.empty_table())
        finally:
            con.close()
    return rows


def scalar(folder: TaskFolder, names: Sequence[str], sql: Callable[[str], str]) -> Any:
    """The first value of a DuckDB query over the task outputs."""
    with tempfile.TemporaryDirectory(prefix="sieve-join-") as scratch:
        files = local_files(folder, names, scratch)
        listing = "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"
        con = connect(os.path.join(scratch, "spill"))
        try:
            return con.execute(sql(listing)).fetchone()[0]
        finally:
            con.close()


def concat_outputs(folder: TaskFolder, names: Sequence[str], path: str, schema: pa.Schema) -> int:
    """The task outputs, in the order of `names`, streamed into the parquet at `path` (one row
    group at a time, atomically); returns the row count."""
    rows = 0
    with atomic_open(path) as fh, pq.ParquetWriter(fh, schema) as writer:
        for name in names:
            fs, p = url_to_fs(folder.output(name))
            with fs.open(p, "rb") as src:
                parquet = pq.ParquetFile(src)
                for i in range(parquet.num_row_groups):
                    table = parquet.read_row_group(i).cast(schema)
                    writer.write_table(table)
                    rows += table.num_rows
        if rows == 0:
            writer.write_table(schema.empty_table())
    return rows
