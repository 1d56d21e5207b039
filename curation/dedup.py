"""Find a collection's duplicates: exact (same bytes), copies (the same picture transformed)
and semantic (SemDeDup). The collection is never changed; the result is a table.

    python -m curation.dedup COLLECTION [--level exact|copies|semantic|exact,copies,...]
                             [--eps 0.05] [--scheduler tcp://host:8786] [--workers N] [--run NAME]

writes `dedup/{run}/duplicates.parquet` (key, group, kept, reason, nearest_key, similarity:
one row per member of each duplicate group, the kept one included) and `report.json`. A
subset spec's `dedup: {level, eps}` clause (`subset_clause`) reads it.

Each level runs alone (`--level semantic` reads no picture); several levels at once
(`--level exact,copies,semantic`, run `exact-copies-semantic-eps0.05`) run in this order, each
on what the ones before it kept:
- exact: the same `sha256`;
- copies: a banded perceptual-hash index and the image index's nearest neighbours propose
  pairs (`curation.copy_candidates`: one Dask task per band and per embedding part, parquet
  tables); the pixel check of `curation.copies` decides, in one Dask task per group of pairs
  that reads its pictures from the source shards (`curation.pictures`). The task files stay in
  `dedup/{run}/copies-work/`, so a killed run rerun redoes only its unfinished tasks;
- semantic: SemDeDup on the image embeddings (`curation.semdedup`: one Dask task per cluster
  group). ε is a cosine distance: a sample is removed when its cosine similarity to a sample
  kept before it in its cluster exceeds 1 − ε; larger ε removes more.

Keep rule, the same at every level: in each group the sample with the most pixels is kept,
then the one with the highest image·text similarity, then the earliest in the collection.
The stages are in `curation.dedup_stages`.
"""

from __future__ import annotations

import argparse
import json
import logging
import posixpath
import time
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa

from collection import schema as S
from collection.cluster_options import add_cluster_options
from collection.parts import CollectionError, read_metadata
from collection.storage import write_json
from curation.dedup_stages import (  # noqa: F401 - COPY_MIN_COSINE, keep_ranks: public names
    COPY_MIN_COSINE,
    Links,
    Runner,
    copies_stage,
    duplicate_rows,
    exact_stage,
    keep_ranks,
    semantic_stage,
)
from curation.semdedup import SemanticParams, check_eps
from curation.semdedup_job import semantic_run
from curation.vector_jobs import TaskFolder
from curation.vectors import ids_of, open_store, read_table, write_table
from models.runtime import cores, progress, setup_logging

log = logging.getLogger(__name__)

#: the copies level's task files (candidates, plan, verdicts) inside its run folder: kept, so a
#: killed run rerun with the same inputs redoes only the tasks that did not finish
COPIES_WORK = "copies-work"


def _runner(scheduler: str | None, workers: int | None) -> tuple[Runner, int, Callable[[], None]]:
    """(run tasks, how many task slots, close) on a Dask cluster,
    or in this process when workers == 0."""
    if workers == 0 and not scheduler:

        def local(fn: Callable[..., Any], args: list[tuple]) -> list[Any]:
            return [
                fn(*a) for a in progress(args, desc=fn.__name__, unit="task", disable=len(args) < 2)
            ]

        return local, 1, lambda: None
    # Dask: imported only when tasks run, so `--help` and `--workers 0` runs stay light
    from collection.cluster import SINGLE_THREAD_WORKER_ENV, each_completed, open_cluster

    session = open_cluster(scheduler, workers or cores(), worker_env=SINGLE_THREAD_WORKER_ENV)

    def remote(fn: Callable[..., Any], args: list[tuple]) -> list[Any]:
        results: list[Any] = [None] * len(args)
        with progress(total=len(args), desc=fn.__name__, unit="task") as bar:
            for outcome in each_completed(session.client, fn, args, fn.__name__):
                if outcome.error is not None:
                    raise outcome.error
                results[outcome.index] = outcome.value
                bar.update(1)
        return results

    return remote, session.slots, session.close


def dedup(
    collection: str,
    level: str | Sequence[str] = S.LEVEL_COPIES,
    eps: float = 0.05,
    scheduler: str | None = None,
    workers: int | None = None,
    run: str | None = None,
    params: SemanticParams = SemanticParams(),
    keep_work: bool = False,
) -> dict[str, Any]:
    """Find duplicates at `level` (one level, or several: "exact,copies" or a list, run in
    S.DEDUP_LEVELS order, each on what the ones before kept); write dedup/{run}/duplicates.parquet
    and report.json; return the report.

    `workers=0` runs every task in this process (small collections, tests); otherwise a Dask
    LocalCluster of `workers` processes, or the cluster at `scheduler`. `keep_work` keeps the
    copies level's task files (candidate pairs, verdicts) after the report, to study them.
    """
    levels = S.dedup_levels(level)
    check_eps(eps)
    run = run or S.dedup_run_name(levels, eps)
    if levels == (S.LEVEL_SEMANTIC,):  # alone: tasks all through, nothing per sample here
        return semantic_run(collection, eps, run, scheduler, workers, params)
    started = time.time()
    store = open_store(collection, S.MODALITY_IMAGE)
    meta = read_metadata(
        collection,
        [S.KEY, S.PART, S.ROW, S.SHA256, S.PHASH, S.WIDTH, S.HEIGHT, S.CLIP_SIMILARITY]
        + [S.SOURCE_SHARD, S.SOURCE_OFFSET, S.SOURCE_SIZE],
    )
    if meta.num_rows != store.count:
        raise CollectionError(
            f"{collection}: {meta.num_rows} embedded rows but {store.count} image vectors"
        )
    for col in (S.KEY, S.SHA256) if S.LEVEL_EXACT in levels else (S.KEY,):
        if col not in meta.column_names:
            raise CollectionError(f"{collection}: metadata has no {col!r} column")
    ranks = keep_ranks(meta)
    links = Links(meta.num_rows)
    report: dict[str, Any] = {
        "collection": collection,
        "level": ",".join(levels),
        "levels": list(levels),
        "eps": eps,
        "run": run,
        "samples": meta.num_rows,
        "keep_rule": "most pixels, best clip_similarity, earliest",
    }
    layout = S.InsightLayout(collection)
    runner, close = (None, lambda: None)
    try:
        if S.LEVEL_EXACT in levels:
            t0 = time.time()
            report["exact"] = {
                "removed": exact_stage(meta, ranks, links, store),
                "seconds": round(time.time() - t0, 3),
            }
        if levels != (S.LEVEL_EXACT,):
            runner, _, close = _runner(scheduler, workers)
        if S.LEVEL_COPIES in levels:
            t0 = time.time()
            report["copies"] = {
                **copies_stage(
                    collection,
                    meta,
                    ranks,
                    links,
                    store,
                    runner,
                    posixpath.join(layout.dedup_run(run), COPIES_WORK),
                ),
                "seconds": round(time.time() - t0, 3),
            }
        if S.LEVEL_SEMANTIC in levels:
            t0 = time.time()
            report["semantic"] = {
                **semantic_stage(collection, ranks, links, store, eps, runner, params),
                "seconds": round(time.time() - t0, 3),
                "params": vars(params),
            }
    finally:
        close()
    table = duplicate_rows(links, meta.column(S.KEY))
    write_table(layout.duplicates(run), table)
    removed = int((links.parent >= 0).sum())
    reasons = {r: links.count(r) for r in S.DUP_REASONS}
    report.update(
        removed=removed,
        removed_fraction=removed / max(meta.num_rows, 1),
        removed_by_reason=reasons,
        groups=int(len(np.unique(table.column(S.DUP_GROUP).to_numpy()))) if table.num_rows else 0,
        seconds=round(time.time() - started, 3),
        finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    write_json(layout.dedup_report(run), report)
    if S.LEVEL_COPIES in levels and not keep_work:  # the run is complete: its task files are spent
        TaskFolder(posixpath.join(layout.dedup_run(run), COPIES_WORK), {}).remove()
    log.info(
        "%s: %s removes %d of %d samples (%s) -> %s",
        collection,
        report["level"],
        removed,
        meta.num_rows,
        reasons,
        layout.duplicates(run),
    )
    return report


def read_duplicates(
    collection: str,
    level: str | Sequence[str] = S.LEVEL_COPIES,
    eps: float = 0.05,
    run: str | None = None,
) -> pa.Table:
    """The duplicates table of a run: by default the run of exactly these levels
    (FileNotFoundError naming the command that writes it)."""
    levels = S.dedup_levels(level)
    run = run or S.dedup_run_name(levels, eps)
    return read_table(
        S.InsightLayout(collection).duplicates(run),
        f"duplicates for {run}; run `python -m curation.dedup "
        f"{collection} --level {','.join(levels)} --eps {eps}`",
    )


def subset_clause(
    collection: str,
    ids: Sequence[int] | np.ndarray,
    level: str | Sequence[str] = S.LEVEL_COPIES,
    eps: float = 0.05,
) -> np.ndarray:
    """A subset spec's `dedup: {level, eps}` clause: `ids` less all but one
    member of each duplicate group of the run of exactly `level` (one level or several).

    Within the subset each group keeps its kept sample when present, else its earliest member
    present. The run is computed first (in this process) when it does not exist yet.
    """
    try:
        level = S.dedup_levels(level)
    except ValueError as exc:
        raise ValueError(f"dedup clause: {exc}") from None
    check_eps(eps)
    ids = np.asarray(ids, dtype=np.int64)
    try:
        table = read_duplicates(collection, level, eps)
    except FileNotFoundError:
        log.info(
            "%s: no %s duplicates yet; finding them now", collection, S.dedup_run_name(level, eps)
        )
        dedup(collection, level, eps, workers=0)
        table = read_duplicates(collection, level, eps)
    if not table.num_rows:
        return ids
    keys = read_metadata(collection, [S.KEY]).column(S.KEY)
    gids = ids_of(keys, table.column(S.DUP_KEY), "duplicates table")
    groups = table.column(S.DUP_GROUP).to_numpy()
    kept = table.column(S.DUP_KEPT).to_numpy(zero_copy_only=False)
    return one_per_group(ids, gids, groups, kept)


def one_per_group(
    ids: np.ndarray, gids: np.ndarray, groups: np.ndarray, kept: np.ndarray
) -> np.ndarray:
    """`ids` less all but one member present of each group (members `gids`, their `groups` and
    `kept` flags): the kept one when present, else the earliest present. On arrays only."""
    order = np.lexsort((gids, ~kept, groups))  # per group: the kept one first, then by position
    order = order[np.isin(gids[order], ids)]
    first = np.ones(len(order), bool)
    first[1:] = groups[order][1:] != groups[order][:-1]
    return ids[~np.isin(ids, gids[order][~first])]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m curation.dedup",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("collection")
    p.add_argument(
        "--level",
        default=S.LEVEL_COPIES,
        help="exact: same bytes; copies: the same picture transformed; semantic: SemDeDup; "
        "each alone, or several comma-separated (exact,copies,semantic), run in that order",
    )
    p.add_argument(
        "--eps",
        type=float,
        default=0.05,
        help="semantic only: a cosine distance in (0, 1); "
        "a sample is removed when its cosine similarity "
        "to a sample kept before it in its cluster exceeds 1 - eps (SemDeDup's code; its README's "
        "'lower eps prunes more' is backwards): larger eps removes more",
    )
    add_cluster_options(p)
    p.add_argument(
        "--run", default=None, help="name of the dedup/{run} folder (default: the level, and eps)"
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=SemanticParams.group_size,
        help="vectors per semantic cluster group (one task)",
    )
    p.add_argument(
        "--leaf-size",
        type=int,
        default=SemanticParams.leaf_size,
        help="vectors per compared cluster",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--keep-work",
        action="store_true",
        help="keep the copies level's task files (dedup/{run}/copies-work: candidate pairs, "
        "verdicts) after the report",
    )
    a = p.parse_args(argv)
    setup_logging()
    params = SemanticParams(group_size=a.group_size, leaf_size=a.leaf_size, seed=a.seed)
    try:
        report = dedup(
            a.collection, a.level, a.eps, a.scheduler, a.workers, a.run, params, a.keep_work
        )
    except (ValueError, FileNotFoundError) as exc:  # bad input: one line, no traceback
        p.error(str(exc))
    print(
        json.dumps(
            {
                k: report[k]
                for k in (
                    "run",
                    "samples",
                    "removed",
                    "removed_fraction",
                    "removed_by_reason",
                    "groups",
                    "seconds",
                )
            }
        )
    )


if __name__ == "__main__":
    main()
