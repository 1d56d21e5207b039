"""Candidate pairs of the copies level, bounded per sample and kept as tables.

Three sources propose pairs; none decides (the pixel check of `curation.copies` does):

- a banded perceptual-hash index: the 64-bit phash split into PHASH_MAX_DISTANCE + 1 bands, so
  that two hashes within PHASH_MAX_DISTANCE bits agree exactly on at least one band
  (pigeonhole); one task per band joins the rows on that band's value (DuckDB) and keeps the
  pairs within the distance, each row's PHASH_PER_ROW nearest;
- the image index's COPY_NEIGHBOURS nearest neighbours at cosine >= COPY_MIN_COSINE: one task
  per embedding part searches the collection's index for that part's vectors;
- shared local hashes (`curation.copy_sketch`: what survives a crop or an overlay): sketch tasks
  (`curation.pictures.sketch_rows`) read SKETCH_ROWS pictures each and write their hashes, then
  one task per hash partition joins them, leaving out hashes that more than LOCAL_MAX_SHARED
  pictures share and keeping each picture's LOCAL_PER_ROW partners sharing the most.

Each source proposes a bounded number of pairs per row, so the pixel checks grow as N, not N^2:
pictures alike (a crowd of generated scenes, a flat ground) would otherwise pair with each
other.

Every task reads its inputs from the run's work folder (`rows.parquet`: id, alive, phash and
where each picture sits) and writes a parquet file; `plan_pairs` then writes the distinct pairs,
with both pictures' locations, as one file per verdict task. The driver holds only file names
and counts.
"""

from __future__ import annotations

import logging
import posixpath
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from collection import schema as S
from collection.embeddings import EmbeddingStore
from collection.storage import url_to_fs, write_json
from curation.vectors import load_collection_index, search_batch, search_depth, write_table

log = logging.getLogger(__name__)

#: perceptual-hash pairs within this Hamming distance are candidates: 8 bands of 8 bits. At 20k
#: generated samples 97-100% of re-encoded, resized and colour-shifted copies lie within it
#: (crops: 6%, overlays: 49%, whatever the distance that keeps bands selective; the embedding
#: neighbours carry those): `python -m bench.scale_copies`, key `copies.by_rows.*.planted`
PHASH_MAX_DISTANCE = 7
#: each row keeps, per band, its PHASH_PER_ROW nearest partners within the distance (Hamming,
#: then id). Generated pictures crowd a few band values (the largest shared by 1,078 of 20k
#: rows, 5,051 of 100k; over 100 rows with one phash) and every pair of a crowd within 7 bits
#: was a candidate: 6.3 phash pairs per row at 20k, 33.8 at 100k (quadratic); 1.5 and 2.4 with
#: 4 per row. With 8 / 16 per row, 100k kept 0.0002 / 0.0009 more of the planted pairs
#: (`python -m bench.copy_candidates`, key `by_rows.*.by_source.phash`)
PHASH_PER_ROW = 4
#: band values shared by more rows than this are left to the other bands (a pair within the
#: distance agrees on at least one band): a band's join makes at most this many comparisons
#: per row, which a crowd would otherwise make quadratic (at 100k the largest value of 5 of
#: the 8 bands went over)
PHASH_MAX_SHARED = 4096
#: image-embedding neighbours of each sample proposed as candidates. Crops and overlays are
#: what sieve-tiny ranks lowest, and more so as the collection grows: among 20k generated
#: samples the original was within a planted crop's 20 nearest for 85%, among 100k for 71%.
#: At 100k, with the phash and local bounds below, the planted pairs among all candidates were
#: 0.9785 / 0.9794 / 0.9808 / 0.9834 with 20 / 25 / 30 / 40 neighbours (exact ranks); each
#: neighbour more costs up to a pixel check per sample (`python -m bench.copy_candidates`,
#: key `by_rows.*.planted`)
COPY_NEIGHBOURS = 30
#: and their cosine floor: the 1% quantile of the planted copies' cosine to their originals
#: (0.587 at 20k generated samples, sieve-tiny; `python -m bench.scale_copies`, key
#: `copies.by_rows.*.planted.cosine_quantiles`), rounded down
COPY_MIN_COSINE = 0.55
#: a local hash (`curation.copy_sketch`) shared by more pictures than this says nothing about
#: any pair of them (a shape's corner on a flat ground) and proposes none: candidates per picture
#: stay under its hashes x LOCAL_MAX_SHARED. At 20k generated samples a cap of 8 kept 98% of the
#: planted crops and 99% of the overlays that one shared hash finds, and 25% of the pairs
LOCAL_MAX_SHARED = 8
#: and each picture keeps, per partition, the LOCAL_PER_ROW partners sharing the most hashes
#: (then the lowest id): local pairs per row grew from 2.3 at 20k to 3.7 at 100k (more hashes
#: shared by 2-8 pictures); 3.3 with 4, which at 100k lost one planted crop (0.9459 -> 0.9448)
LOCAL_PER_ROW = 4
#: partitions of the local-hash join (one task each, by the hash's low bits: a power of 2)
LOCAL_PARTITIONS = 8
#: rows per sketch task (each reads its rows' pictures)
SKETCH_ROWS = 5000
#: the candidate sources, as `curation.dedup_stages.candidate_stage` names their pair files
SOURCE_PHASH, SOURCE_KNN, SOURCE_LOCAL = "phash", "knn", "local"
#: candidate pairs per verdict task
PAIRS_PER_TASK = 4000
#: the columns of the rows table that say where a picture is (`collection.images.COLUMNS`)
LOCATION = (S.SOURCE_SHARD, S.KEY, S.SOURCE_OFFSET, S.SOURCE_SIZE, S.SHA256)
#: DuckDB's memory in one task: larger joins spill to its temporary folder
DUCKDB_MEMORY = "1GB"


def bands(max_distance: int = PHASH_MAX_DISTANCE) -> list[tuple[int, int]]:
    """(shift, width) of each of max_distance + 1 contiguous bands covering the 64 bits, as
    even as possible: hashes within max_distance bits differ in at most max_distance bands."""
    count = max_distance + 1
    if not 1 <= count <= 64:
        raise ValueError(f"phash distance must be in 0..63, got {max_distance}")
    widths = [64 // count + (b < 64 % count) for b in range(count)]
    shifts = np.concatenate([[0], np.cumsum(widths)[:-1]])
    return [(int(s), int(w)) for s, w in zip(shifts, widths)]


def _connect() -> duckdb.DuckDBPyConnection:
    # one thread: a task runs on one worker slot
    return duckdb.connect(config={"threads": 1, "memory_limit": DUCKDB_MEMORY})


def rows_table(meta: pa.Table, alive: np.ndarray) -> pa.Table:
    """The work table every task reads: global id, alive (kept by the levels before), phash as a
    64-bit integer (null when unknown) and the picture's location columns."""
    n = meta.num_rows
    mask = np.zeros(n, bool)
    mask[alive] = True
    cols: dict[str, Any] = {"id": pa.array(np.arange(n, dtype=np.int64)), "alive": mask}
    phash = meta.column(S.PHASH) if S.PHASH in meta.column_names else pa.nulls(n, pa.string())
    con = _connect()
    con.register("p", pa.table({"h": phash}))
    # an empty phash means unknown, as null does (check_phashes refused any other non-hex one)
    cols["phash"] = con.sql(
        "SELECT CASE WHEN length(h) = 16 THEN ('0x' || h)::UBIGINT END AS v FROM p"
    ).to_arrow_table()["v"]
    con.close()
    for name in LOCATION:
        cols[name] = meta.column(name) if name in meta.column_names else pa.nulls(n)
    return pa.table(cols)


def _read(path: str, columns: list[str] | None = None) -> pa.Table:
    fs, p = url_to_fs(path)
    with fs.open(p, "rb") as fh:
        return pq.read_table(fh, columns=columns)


def band_pairs(
    rows_path: str,
    out: str,
    shift: int,
    width: int,
    max_distance: int,
    per_row: int | None = None,
    max_shared: int | None = None,
) -> int:
    """One band's task: pairs (i < j) of alive rows equal on the band and within max_distance
    bits, written to `out`; returns how many. With `per_row`, a pair is kept only when one of
    its rows has the other among its `per_row` nearest in the band (Hamming distance, then id);
    with `max_shared`, band values more rows than that share are left to the other bands."""
    rows = _read(rows_path, ["id", "alive", "phash"])
    con = _connect()
    con.register("rows", rows)
    mask = (1 << width) - 1
    shared = f"HAVING count(*) <= {int(max_shared)}" if max_shared else ""
    table = con.sql(
        f"""
        WITH t AS (
            SELECT id, phash, (phash >> {shift}) & {mask}::UBIGINT AS v
            FROM rows WHERE alive AND phash IS NOT NULL
        ),
        ok AS (SELECT v FROM t GROUP BY v {shared}),
        u AS (SELECT t.* FROM t JOIN ok USING (v))
        SELECT a.id AS i, b.id AS j, bit_count(xor(a.phash, b.phash)) AS d
        FROM u a JOIN u b ON a.v = b.v AND a.id < b.id
        WHERE d <= {int(max_distance)}
        """
    )
    if per_row:
        table = nearest_per_row(con, table, "d", int(per_row))
    table = table.select("i, j").to_arrow_table()
    con.close()
    write_table(out, table)
    return table.num_rows


def nearest_per_row(
    con: duckdb.DuckDBPyConnection, pairs: duckdb.DuckDBPyRelation, key: str, per_row: int
) -> duckdb.DuckDBPyRelation:
    """The pairs (i < j) of `pairs` where one row has the other among its `per_row` first
    partners by `key` (ascending, then the partner's id): at most per_row pairs per row, and a
    row's nearest partners kept however many others are near."""
    con.register("_pairs", pairs.select(f"i, j, {key} AS k").to_arrow_table())
    return con.sql(
        f"""
        WITH q AS (SELECT i AS a, j AS b, k FROM _pairs UNION ALL SELECT j, i, k FROM _pairs),
        kept AS (
            SELECT a, b FROM q
            QUALIFY row_number() OVER (PARTITION BY a ORDER BY k, b) <= {per_row}
        )
        SELECT DISTINCT least(a, b) AS i, greatest(a, b) AS j FROM kept
        """
    )


def knn_pairs(
    collection: str, rows_path: str, out: str, part: int, k: int, min_cosine: float
) -> int:
    """One embedding part's task: pairs (i < j) of alive rows where one is among the other's k
    nearest image-index neighbours at cosine >= min_cosine, written to `out`; returns how
    many."""
    store = EmbeddingStore.open(collection, S.MODALITY_IMAGE)
    index, doc = load_collection_index(collection, S.MODALITY_IMAGE)
    alive = _read(rows_path, ["alive"]).column(0).to_numpy(zero_copy_only=False)
    depth = search_depth(doc, store.count, k)
    start = int(store.offsets[part])
    vectors = store.arrays[part]
    found_i, found_j = [], []
    for lo in range(0, vectors.shape[0], 2048):
        q = np.ascontiguousarray(np.asarray(vectors[lo : lo + 2048]), dtype=np.float32)
        ids, sims = search_batch(index, store, q, start + lo, depth, k)
        rows = np.repeat(np.arange(start + lo, start + lo + len(q)), ids.shape[1])
        cols, s = ids.ravel(), np.nan_to_num(sims.ravel(), nan=-1.0)
        ok = (cols >= 0) & (s >= min_cosine)
        ok[ok] &= alive[rows[ok]] & alive[cols[ok]]
        found_i.append(np.minimum(rows[ok], cols[ok]))
        found_j.append(np.maximum(rows[ok], cols[ok]))
    i = np.concatenate(found_i) if found_i else np.zeros(0, np.int64)
    j = np.concatenate(found_j) if found_j else np.zeros(0, np.int64)
    write_table(out, pa.table({"i": i.astype(np.int64), "j": j.astype(np.int64)}))
    return len(i)


def local_pairs(
    sketch_files: list[str],
    out: str,
    part: int,
    parts: int,
    max_shared: int,
    per_row: int | None = None,
) -> int:
    """One partition's task: pairs (i < j) of pictures sharing a local hash (of those whose low
    bits say `part` of `parts`) that at most max_shared pictures have, written to `out`; returns
    how many. With `per_row`, a pair is kept only when one of its pictures has the other among
    its `per_row` partners sharing the most of these hashes (then the lowest id)."""
    tables = [_read(f, ["id", "h"]) for f in sketch_files]
    empty = pa.table({"id": pa.array([], pa.int64()), "h": pa.array([], pa.int64())})
    sketch = pa.concat_tables(tables) if tables else empty
    con = _connect()
    con.register("sketch", sketch)
    pairs = con.sql(
        f"""
        WITH s AS (SELECT DISTINCT id, h FROM sketch WHERE (h & {parts - 1}) = {part}),
        ok AS (SELECT h FROM s GROUP BY h HAVING count(*) <= {int(max_shared)}),
        t AS (SELECT s.id, s.h FROM s JOIN ok USING (h))
        SELECT a.id AS i, b.id AS j, -count(*) AS d
        FROM t a JOIN t b ON a.h = b.h AND a.id < b.id GROUP BY a.id, b.id
        """
    )
    if per_row:
        pairs = nearest_per_row(con, pairs, "d", int(per_row))
    table = pairs.select("i, j").to_arrow_table()
    con.close()
    write_table(out, table)
    return table.num_rows


def plan_pairs(work: str, candidate_files: list[str], pairs_per_task: int) -> dict[str, int]:
    """The distinct candidate pairs, ordered, each with both pictures' locations (columns
    `a_...` and `b_...`), written as `pairs-{t}.parquet` per verdict task, then `plan.json`
    (written last: its presence says the plan is complete). Returns {pairs, tasks}."""
    rows = _read(posixpath.join(work, "rows.parquet"), ["id", *LOCATION])
    cands = pa.concat_tables(
        [_read(f).select(["i", "j"]) for f in candidate_files]
        or [pa.table({"i": pa.array([], pa.int64()), "j": pa.array([], pa.int64())})]
    )
    con = _connect()
    con.register("rows", rows)
    con.register("cands", cands)
    side = ", ".join(f"{t}.{c} AS {t}_{c}" for t in ("a", "b") for c in LOCATION)
    table = con.sql(
        f"""
        WITH p AS (SELECT DISTINCT i, j FROM cands)
        SELECT p.i, p.j, {side} FROM p
        JOIN rows a ON a.id = p.i JOIN rows b ON b.id = p.j
        ORDER BY p.i, p.j
        """
    ).to_arrow_table()
    con.close()
    tasks = -(-table.num_rows // pairs_per_task)
    for t in range(tasks):
        write_table(pair_file(work, t), table.slice(t * pairs_per_task, pairs_per_task))
    plan = {"pairs": table.num_rows, "tasks": tasks}
    write_json(posixpath.join(work, "plan.json"), plan)
    return plan


def pair_file(work: str, task: int) -> str:
    return posixpath.join(work, f"pairs-{task:05d}.parquet")


def verdict_file(work: str, task: int) -> str:
    return posixpath.join(work, f"verdict-{task:05d}.parquet")
