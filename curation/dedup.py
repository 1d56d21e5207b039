"""Find a collection's duplicates: exact (same bytes), copies (the same picture transformed)
and semantic (SemDeDup). The collection is never changed; the result is a table.

    python -m curation.dedup COLLECTION [--level exact|copies|semantic] [--eps 0.05]
                             [--scheduler tcp://host:8786] [--workers N] [--run NAME]

writes `dedup/{run}/duplicates.parquet` (key, group, kept, reason, nearest_key, similarity:
one row per member of each duplicate group, the kept one included) and `report.json`. A
subset spec's `dedup: {level, eps}` clause (`subset_clause`) reads it.

Levels include the ones before them, in this order:
- exact: the same `sha256`;
- copies: image-embedding neighbours (the collection's index) and perceptual-hash neighbours
  propose pairs; the pixel check of `curation.copies` decides (pictures are re-read from the
  source shards, one Dask task per shard, and pairs checked in Dask tasks);
- semantic: SemDeDup on the image embeddings of what is left (`curation.semdedup`: one Dask
  task per cluster group). ε is a cosine distance: a sample is removed when its cosine
  similarity to a sample kept before it in its cluster exceeds 1 − ε; larger ε removes more.

Keep rule, the same at every level: in each group the sample with the most pixels is kept,
then the one with the highest image·text similarity, then the earliest in the collection.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any, Callable, Sequence

import faiss
import numpy as np
import pyarrow as pa

from collection import schema as S
from collection.parts import CollectionError, read_metadata
from collection.shards import ShardOpenError
from collection.storage import write_json
from curation.copies import copy_verdict, is_copy, phash_bits  # noqa: F401 - copy_verdict: the audit's entry point
from curation.pictures import load_thumbnails
from curation.semdedup import EPS_TABLE, SemanticParams, check_eps, group_links, root_groups
from curation.vectors import ids_of, neighbours, open_store, read_keys, read_table, write_table
from models.runtime import cores, progress, setup_logging

log = logging.getLogger(__name__)

#: image-embedding neighbours of each sample proposed as copy candidates, and their cosine floor
COPY_NEIGHBOURS = 10
COPY_MIN_COSINE = 0.5
#: perceptual-hash neighbours proposed as copy candidates, and their Hamming distance ceiling
PHASH_NEIGHBOURS = 10
PHASH_MAX_DISTANCE = 16
#: above this many vectors the perceptual-hash search uses an HNSW graph instead of brute force
PHASH_BRUTE_FORCE_MAX = 250_000
_REASON_ORDER = {r: i for i, r in enumerate(S.DUP_REASONS)}

Runner = Callable[[Callable[..., Any], list[tuple]], list[Any]]


def keep_ranks(meta: pa.Table) -> np.ndarray:
    """Each sample's place in the keep order (0 = kept first): most pixels, best image·text
    similarity, earliest."""
    n = meta.num_rows

    def col(name: str, missing: float) -> np.ndarray:
        if name not in meta.column_names:
            return np.full(n, missing)
        values = np.asarray(meta.column(name).to_pylist(), dtype=float)  # nulls become NaN
        return np.nan_to_num(values, nan=missing, posinf=missing, neginf=missing)

    pixels = col(S.WIDTH, 0.0) * col(S.HEIGHT, 0.0)
    order = np.lexsort((np.arange(n), -col(S.CLIP_SIMILARITY, -1e9), -pixels))
    ranks = np.empty(n, np.int64)
    ranks[order] = np.arange(n)
    return ranks


class Links:
    """Each removed sample points at the sample that made it a duplicate:
    a forest whose roots are kept."""

    def __init__(self, n: int) -> None:
        self.parent = np.full(n, -1, np.int64)
        self.reason = np.empty(n, dtype=object)
        self.similarity = np.full(n, np.nan, np.float32)

    def link(self, child: int, parent: int, reason: str, similarity: float) -> None:
        self.parent[child], self.reason[child], self.similarity[child] = parent, reason, similarity

    @property
    def alive(self) -> np.ndarray:
        return np.nonzero(self.parent < 0)[0]

    def roots(self) -> np.ndarray:
        """Each sample's kept root (itself when kept), by pointer jumping."""
        root = np.where(self.parent >= 0, self.parent, np.arange(len(self.parent)))
        while True:
            nxt = root[root]
            if np.array_equal(nxt, root):
                return root
            root = nxt


def _cosine(store: Any, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if not len(a):
        return np.zeros(0, np.float32)
    return np.einsum("nd,nd->n", store.gather(a), store.gather(b))


def exact_stage(meta: pa.Table, ranks: np.ndarray, links: Links, store: Any) -> int:
    """Link samples with the same sha256 to the kept one of their group;
    returns the number removed."""
    sha = np.asarray(meta.column(S.SHA256).to_pylist(), dtype=object)
    groups: dict[str, list[int]] = {}
    for i, h in enumerate(sha):
        if h:
            groups.setdefault(h, []).append(i)
    children, parents = [], []
    for members in groups.values():
        if len(members) > 1:
            kept = min(members, key=lambda i: ranks[i])
            for m in members:
                if m != kept:
                    children.append(m)
                    parents.append(kept)
    sims = _cosine(store, np.array(children, np.int64), np.array(parents, np.int64))
    for c, p, s in zip(children, parents, sims):
        links.link(c, p, S.REASON_EXACT, float(s))
    return len(children)


def copy_candidates(collection: str, meta: pa.Table, alive: np.ndarray, store: Any) -> np.ndarray:
    """(m, 2) sorted unique pairs (i < j) of alive samples proposed by
    image-embedding or phash neighbours."""
    alive_mask = np.zeros(meta.num_rows, bool)
    alive_mask[alive] = True
    nb_ids, nb_sims = neighbours(collection, COPY_NEIGHBOURS, S.MODALITY_IMAGE, store)
    rows = np.repeat(np.arange(meta.num_rows), COPY_NEIGHBOURS)
    cols, sims = nb_ids.ravel(), nb_sims.ravel()
    ok = (cols >= 0) & (np.nan_to_num(sims, nan=-1.0) >= COPY_MIN_COSINE)
    pairs = [np.stack([rows[ok], cols[ok]], 1)]
    hashes = (
        meta.column(S.PHASH).to_pylist() if S.PHASH in meta.column_names else [None] * meta.num_rows
    )
    known = np.array([bool(h) for h in hashes], dtype=bool)
    if known.any():
        hid = np.nonzero(known)[0]
        bits = phash_bits([hashes[i] for i in hid])
        if len(hid) <= PHASH_BRUTE_FORCE_MAX:
            index = faiss.IndexBinaryFlat(64)
        else:
            index = faiss.IndexBinaryHNSW(64, 32)
        index.add(bits)
        dist, nn = index.search(bits, min(PHASH_NEIGHBOURS + 1, len(hid)))
        r = np.repeat(hid, nn.shape[1])
        c = np.where(nn.ravel() >= 0, hid[np.maximum(nn.ravel(), 0)], -1)
        ok = (nn.ravel() >= 0) & (dist.ravel() <= PHASH_MAX_DISTANCE) & (c != r)
        pairs.append(np.stack([r[ok], c[ok]], 1))
    pairs = np.concatenate(pairs)
    pairs = pairs[alive_mask[pairs[:, 0]] & alive_mask[pairs[:, 1]] & (pairs[:, 0] != pairs[:, 1])]
    return np.unique(np.sort(pairs, axis=1), axis=0)


def check_pairs(pairs: np.ndarray, thumbs: dict[int, np.ndarray]) -> np.ndarray:
    """Boolean verdict per pair (one task); pairs whose pictures could not be re-read are False."""
    out = np.zeros(len(pairs), bool)
    for n, (i, j) in enumerate(pairs):
        a, b = thumbs.get(int(i)), thumbs.get(int(j))
        out[n] = a is not None and b is not None and is_copy(a, b)
    return out


def copies_stage(
    collection: str,
    meta: pa.Table,
    ranks: np.ndarray,
    links: Links,
    store: Any,
    run: Runner,
    tasks: int,
) -> dict[str, int]:
    """Link verified copies to the kept sample of their group (through the verified pairs)."""
    if S.SOURCE_SHARD not in meta.column_names:
        raise CollectionError(
            f"{collection}: metadata has no {S.SOURCE_SHARD!r} column; the copies level re-reads "
            "pictures from the source shards"
        )
    pairs = copy_candidates(collection, meta, links.alive, store)
    keys = np.asarray(meta.column(S.KEY).to_pylist(), dtype=object)
    shards = np.asarray(meta.column(S.SOURCE_SHARD).to_pylist(), dtype=object)
    try:
        thumbs = load_thumbnails(keys, shards, np.unique(pairs), run) if len(pairs) else {}
    except ShardOpenError as exc:
        raise CollectionError(
            f"{collection}: the copies level re-reads pictures from the source shards: {exc}"
        ) from exc
    chunks = np.array_split(np.arange(len(pairs)), max(1, min(len(pairs), tasks)))
    args = [
        (pairs[c], {int(i): thumbs[int(i)] for i in np.unique(pairs[c]) if int(i) in thumbs})
        for c in chunks
    ]
    verdict = np.concatenate(run(check_pairs, args)) if len(pairs) else np.zeros(0, bool)
    edges = pairs[verdict]
    adjacency: dict[int, list[int]] = {}
    for i, j in edges:
        adjacency.setdefault(int(i), []).append(int(j))
        adjacency.setdefault(int(j), []).append(int(i))
    seen: set[int] = set()
    removed = 0
    for start in sorted(adjacency):
        if start in seen:
            continue
        component, frontier = [start], [start]
        seen.add(start)
        while frontier:  # breadth first over the verified pairs
            nxt = []
            for node in frontier:
                for other in adjacency[node]:
                    if other not in seen:
                        seen.add(other)
                        component.append(other)
                        nxt.append(other)
            frontier = nxt
        kept = min(component, key=lambda i: ranks[i])
        parent, frontier = {kept: -1}, [kept]
        while frontier:  # each member's parent: a verified partner on the way to the kept one
            nxt = []
            for node in frontier:
                for other in sorted(adjacency[node]):
                    if other not in parent:
                        parent[other] = node
                        nxt.append(other)
            frontier = nxt
        children = np.array([m for m in component if m != kept], np.int64)
        parents = np.array([parent[m] for m in children], np.int64)
        for c, p, s in zip(children, parents, _cosine(store, children, parents)):
            links.link(int(c), int(p), S.REASON_COPY, float(s))
        removed += len(children)
    return {
        "candidate_pairs": int(len(pairs)),
        "verified_pairs": int(len(edges)),
        "pictures_read": len(thumbs),
        "removed": removed,
    }


def semantic_stage(
    collection: str,
    ranks: np.ndarray,
    links: Links,
    store: Any,
    eps: float,
    run: Runner,
    params: SemanticParams,
) -> dict[str, Any]:
    """SemDeDup on what earlier levels kept; links removed samples to their
    most similar preferred one."""
    alive = links.alive
    groups = root_groups(store, alive, params)
    results = run(
        group_links, [((collection, S.MODALITY_IMAGE), g, ranks[g], params) for g in groups]
    )
    ids = np.concatenate([r[0] for r in results]) if results else np.zeros(0, np.int64)
    sims = np.concatenate([r[1] for r in results]) if results else np.zeros(0, np.float32)
    nearest = np.concatenate([r[2] for r in results]) if results else np.zeros(0, np.int64)
    gone = sims > 1.0 - eps
    for i, p, s in zip(ids[gone], nearest[gone], sims[gone]):
        links.link(int(i), int(p), S.REASON_SEMANTIC, float(s))
    n = max(len(ranks), 1)
    table = {
        f"{e:g}": round(float((sims > 1.0 - e).sum()) / n, 6)
        for e in sorted(set(EPS_TABLE) | {eps})
    }
    return {
        "cluster_groups": len(groups),
        "removed": int(gone.sum()),
        "removed_fraction_by_eps": table,
    }


def duplicate_rows(links: Links, keys: np.ndarray) -> pa.Table:
    """The duplicates table: members of every group with more than one sample, groups numbered by
    their kept sample's position in the collection."""
    roots = links.roots()
    members = np.nonzero(links.parent >= 0)[0]
    kept_ids = np.unique(roots[members])
    group_of = {int(r): g for g, r in enumerate(kept_ids)}
    best_child: dict[int, tuple[float, int, str]] = {}
    for c in members:
        p = int(links.parent[c])
        cand = (float(links.similarity[c]), -int(c), links.reason[c])
        if p not in best_child or cand > best_child[p]:
            best_child[p] = cand
    rows = []
    for i in np.sort(np.concatenate([members, kept_ids])):
        i = int(i)
        if links.parent[i] >= 0:
            rows.append(
                (
                    keys[i],
                    group_of[int(roots[i])],
                    False,
                    links.reason[i],
                    keys[int(links.parent[i])],
                    float(links.similarity[i]),
                )
            )
        else:
            sim, child, reason = best_child[i]
            rows.append((keys[i], group_of[i], True, reason, keys[-child], sim))
    cols = list(zip(*rows)) if rows else [[]] * 6
    return pa.table(
        {
            S.DUP_KEY: pa.array(cols[0], pa.string()),
            S.DUP_GROUP: pa.array(cols[1], pa.int64()),
            S.DUP_KEPT: pa.array(cols[2], pa.bool_()),
            S.DUP_REASON: pa.array(cols[3], pa.string()),
            S.DUP_NEAREST: pa.array(cols[4], pa.string()),
            S.DUP_SIMILARITY: pa.array(cols[5], pa.float32()),
        }
    )


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
    level: str = S.LEVEL_COPIES,
    eps: float = 0.05,
    scheduler: str | None = None,
    workers: int | None = None,
    run: str | None = None,
    params: SemanticParams = SemanticParams(),
) -> dict[str, Any]:
    """Find duplicates up to `level`; write dedup/{run}/duplicates.parquet and
    report.json; return the report.

    `workers=0` runs every task in this process (small collections, tests); otherwise a Dask
    LocalCluster of `workers` processes, or the cluster at `scheduler`.
    """
    if level not in S.DEDUP_LEVELS:
        raise ValueError(f"level must be one of {list(S.DEDUP_LEVELS)}, got {level!r}")
    check_eps(eps)
    run = run or S.dedup_run_name(level, eps)
    started = time.time()
    store = open_store(collection, S.MODALITY_IMAGE)
    meta = read_metadata(
        collection, [S.KEY, S.SHA256, S.PHASH, S.WIDTH, S.HEIGHT, S.CLIP_SIMILARITY, S.SOURCE_SHARD]
    )
    if meta.num_rows != store.count:
        raise CollectionError(
            f"{collection}: {meta.num_rows} embedded rows but {store.count} image vectors"
        )
    for col in (S.KEY, S.SHA256):
        if col not in meta.column_names:
            raise CollectionError(f"{collection}: metadata has no {col!r} column")
    keys = np.asarray(meta.column(S.KEY).to_pylist(), dtype=object)
    ranks = keep_ranks(meta)
    links = Links(meta.num_rows)
    report: dict[str, Any] = {
        "collection": collection,
        "level": level,
        "eps": eps,
        "run": run,
        "samples": meta.num_rows,
        "keep_rule": "most pixels, best clip_similarity, earliest",
    }
    t0 = time.time()
    report["exact"] = {
        "removed": exact_stage(meta, ranks, links, store),
        "seconds": round(time.time() - t0, 3),
    }
    runner, slots, close = (None, 1, lambda: None)
    try:
        if level != S.LEVEL_EXACT:
            runner, slots, close = _runner(scheduler, workers)
            t0 = time.time()
            report["copies"] = {
                **copies_stage(collection, meta, ranks, links, store, runner, 4 * slots),
                "seconds": round(time.time() - t0, 3),
            }
        if level == S.LEVEL_SEMANTIC:
            t0 = time.time()
            report["semantic"] = {
                **semantic_stage(collection, ranks, links, store, eps, runner, params),
                "seconds": round(time.time() - t0, 3),
                "params": vars(params),
            }
    finally:
        close()
    table = duplicate_rows(links, keys)
    layout = S.InsightLayout(collection)
    write_table(layout.duplicates(run), table)
    removed = int((links.parent >= 0).sum())
    reasons = {r: int(np.sum(links.reason == r)) for r in S.DUP_REASONS}
    report.update(
        removed=removed,
        removed_fraction=removed / max(meta.num_rows, 1),
        removed_by_reason=reasons,
        groups=int(len(np.unique(table.column(S.DUP_GROUP).to_numpy()))) if table.num_rows else 0,
        seconds=round(time.time() - started, 3),
        finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    write_json(layout.dedup_report(run), report)
    log.info(
        "%s: %s removes %d of %d samples (%s) -> %s",
        collection,
        level,
        removed,
        meta.num_rows,
        reasons,
        layout.duplicates(run),
    )
    return report


def read_duplicates(
    collection: str, level: str = S.LEVEL_COPIES, eps: float = 0.05, run: str | None = None
) -> pa.Table:
    """The duplicates table of a run (FileNotFoundError naming the command that writes it)."""
    run = run or S.dedup_run_name(level, eps)
    return read_table(
        S.InsightLayout(collection).duplicates(run),
        f"duplicates for {run}; run `python -m curation.dedup "
        f"{collection} --level {level} --eps {eps}`",
    )


def subset_clause(
    collection: str, ids: Sequence[int] | np.ndarray, level: str = S.LEVEL_COPIES, eps: float = 0.05
) -> np.ndarray:
    """A subset spec's `dedup: {level, eps}` clause: `ids` less all but one
    member of each duplicate group.

    Within the subset each group keeps its kept sample when present, else its earliest member
    present. The run is computed first (in this process) when it does not exist yet.
    """
    if level not in S.DEDUP_LEVELS:
        raise ValueError(
            f"dedup clause: level must be one of {list(S.DEDUP_LEVELS)}, got {level!r}"
        )
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
    gids = ids_of(read_keys(collection), table.column(S.DUP_KEY).to_pylist(), "duplicates table")
    groups = table.column(S.DUP_GROUP).to_numpy()
    kept = table.column(S.DUP_KEPT).to_numpy(zero_copy_only=False)
    present = np.isin(gids, ids)
    order = np.lexsort((gids, ~kept, groups))  # per group: the kept one first, then by position
    drop, seen = [], set()
    for row in order:
        if not present[row]:
            continue
        if groups[row] in seen:
            drop.append(gids[row])
        else:
            seen.add(groups[row])
    return ids[~np.isin(ids, np.array(drop, np.int64))]


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
        choices=S.DEDUP_LEVELS,
        help="exact: same bytes; copies: + the same picture transformed; semantic: + SemDeDup",
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
    p.add_argument(
        "--scheduler", default=None, help="Dask scheduler address (default: a LocalCluster)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="LocalCluster workers (default: one per core; 0: no Dask)",
    )
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
    a = p.parse_args(argv)
    setup_logging()
    params = SemanticParams(group_size=a.group_size, leaf_size=a.leaf_size, seed=a.seed)
    try:
        report = dedup(a.collection, a.level, a.eps, a.scheduler, a.workers, a.run, params)
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
