"""The dedup levels' stages over one collection, each usable alone: exact (same sha256),
copies (candidate pairs from neighbours, verdicts from the pixels) and semantic (SemDeDup).

Each stage links removed samples to the sample that made them duplicates (`Links`); the
runner in `curation.dedup` chooses which stages run and writes the table `duplicate_rows` makes.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import breadth_first_order, connected_components

from collection import schema as S
from collection.parts import CollectionError
from collection.shards import ShardOpenError
from collection.storage import read_json, url_to_fs, write_json
from curation import copy_candidates as C, copy_sketch as K
from curation.pictures import check_pairs, sketch_rows
from curation.semdedup import EPS_TABLE, SemanticParams, group_links, root_groups
from curation.vectors import matching_index, write_table

log = logging.getLogger(__name__)

#: the memorisation audit's gate (hdit_train.memorisation): below this image-embedding cosine a
#: generated picture is not pixel-checked against a training picture
COPY_MIN_COSINE = 0.5

Runner = Callable[[Callable[..., Any], list[tuple]], list[Any]]


def keep_column(table: pa.Table, name: str, missing: float) -> np.ndarray:
    """A numeric column as the keep rule reads it: float64, nulls and non-finite values replaced by
    `missing` (Arrow to numpy, no Python object per row)."""
    if name not in table.column_names:
        return np.full(table.num_rows, missing)
    values = pc.cast(table.column(name), pa.float64()).to_numpy(zero_copy_only=False)
    return np.nan_to_num(values, nan=missing, posinf=missing, neginf=missing)


def keep_ranks(meta: pa.Table) -> np.ndarray:
    """Each sample's place in the keep order (0 = kept first): most pixels, best image·text
    similarity, earliest."""
    n = meta.num_rows
    pixels = keep_column(meta, S.WIDTH, 0.0) * keep_column(meta, S.HEIGHT, 0.0)
    order = np.lexsort((np.arange(n), -keep_column(meta, S.CLIP_SIMILARITY, -1e9), -pixels))
    ranks = np.empty(n, np.int64)
    ranks[order] = np.arange(n)
    return ranks


class Links:
    """Each removed sample points at the sample that made it a duplicate:
    a forest whose roots are kept. Plain arrays (the reason as its index in S.DUP_REASONS), so
    the driver holds no Python object per sample."""

    def __init__(self, n: int) -> None:
        self.parent = np.full(n, -1, np.int64)
        self.reason = np.full(n, -1, np.int8)
        self.similarity = np.full(n, np.nan, np.float32)

    def link(
        self, children: np.ndarray, parents: np.ndarray, reason: str, similarity: np.ndarray
    ) -> None:
        """Link each of `children` to the parent at the same position, for `reason`."""
        children = np.asarray(children, np.int64)
        self.parent[children] = parents
        self.reason[children] = S.DUP_REASONS.index(reason)
        self.similarity[children] = similarity

    def count(self, reason: str) -> int:
        """How many samples were removed for `reason`."""
        return int(np.count_nonzero(self.reason == S.DUP_REASONS.index(reason)))

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


def cosine(store: Any, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Image-embedding cosine of each pair (a[i], b[i]): the similarity a duplicate row reports."""
    if not len(a):
        return np.zeros(0, np.float32)
    return np.einsum("nd,nd->n", store.gather(a), store.gather(b))


def exact_stage(meta: pa.Table, ranks: np.ndarray, links: Links, store: Any) -> int:
    """Link samples with the same sha256 to the kept one of their group;
    returns the number removed."""
    sha = pc.cast(meta.column(S.SHA256), pa.large_string()).combine_chunks()
    known = pc.fill_null(pc.greater(pc.utf8_length(sha), 0), False)  # empty or null: unknown
    ids = np.nonzero(known.to_numpy(zero_copy_only=False))[0]
    codes = pc.dictionary_encode(sha.filter(known)).indices.to_numpy()
    order = np.lexsort((ranks[ids], codes))  # per sha256, the best ranked first
    first = np.ones(len(order), bool)
    first[1:] = codes[order][1:] != codes[order][:-1]
    kept = ids[order][np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))]
    children, parents = ids[order][~first], kept[~first]
    by_child = np.argsort(children)
    children, parents = children[by_child], parents[by_child]
    links.link(children, parents, S.REASON_EXACT, cosine(store, children, parents))
    return len(children)


def check_phashes(collection: str, meta: pa.Table) -> None:
    """CollectionError naming the metadata part file and row of the first `phash` that is
    present but not 16 hex digits (and how many are bad); empty or null ones mean unknown."""
    if S.PHASH not in meta.column_names:
        return
    column = meta.column(S.PHASH)
    bad = pc.and_(
        pc.fill_null(pc.greater(pc.utf8_length(column), 0), False),
        pc.invert(pc.fill_null(pc.match_substring_regex(column, r"^[0-9a-fA-F]{16}$"), False)),
    )
    count = pc.sum(bad).as_py() or 0
    if not count:
        return
    first = int(pc.index(bad, True).as_py())
    where = f"{collection}: sample {first}"
    if S.PART in meta.column_names and S.ROW in meta.column_names:
        part, row = meta.column(S.PART)[first].as_py(), meta.column(S.ROW)[first].as_py()
        where = f"{S.CollectionLayout(collection).metadata(part)}: row {row}"
    raise CollectionError(
        f"{where}: phash {column[first].as_py()!r} is not 16 hex digits "
        f"({count} bad phash values in the collection); the copies level compares 64-bit "
        "perceptual hashes"
    )


def copies_stage(
    collection: str,
    meta: pa.Table,
    ranks: np.ndarray,
    links: Links,
    store: Any,
    run: Runner,
    work: str,
) -> dict[str, int]:
    """Link verified copies to the kept sample of their group (through the verified pairs).

    Candidates, the plan and the verdicts are tasks writing parquet under `work`; a file already
    there from an interrupted run with the same inputs is kept, so a rerun does only the tasks
    that did not finish and gives the same output."""
    done, files = candidate_stage(collection, meta, links.alive, store, run, work)
    if "plan.json" not in done:
        every = [f for source in files.values() for f in source]
        run(C.plan_pairs, [(work, every, C.PAIRS_PER_TASK)])
    plan = read_json(posixpath.join(work, "plan.json"))
    verdict_args = [(work, t) for t in range(plan["tasks"])]
    todo = [a for a in verdict_args if posixpath.basename(C.verdict_file(*a)) not in done]
    try:
        counts = run(check_pairs, todo) if todo else []
    except ShardOpenError as exc:
        raise CollectionError(
            f"{collection}: the copies level re-reads pictures from the source shards: {exc}"
        ) from exc
    unread = sum(c["unread"] for c in counts)
    if unread:
        log.warning(
            "%d pictures could not be re-read from their source shards; their pairs are not copies",
            unread,
        )
    edges = _verified(work, plan["tasks"])
    removed = link_components(edges, ranks, links, store)
    return {
        "candidate_pairs": int(plan["pairs"]),
        "verified_pairs": int(len(edges)),
        "verdict_tasks": int(plan["tasks"]),
        "verdict_tasks_run": len(todo),
        "pictures_read": int(sum(c["pictures"] for c in counts)),
        "removed": removed,
    }


def candidate_stage(
    collection: str, meta: pa.Table, alive: np.ndarray, store: Any, run: Runner, work: str
) -> tuple[set[str], dict[str, list[str]]]:
    """The copies level's candidate tasks (phash bands, embedding neighbours, local hashes), each
    writing its pairs under `work` unless an interrupted run with the same inputs left them:
    (the files found there at the start, each source's pair files)."""
    if S.SOURCE_SHARD not in meta.column_names:
        raise CollectionError(
            f"{collection}: metadata has no {S.SOURCE_SHARD!r} column; the copies level re-reads "
            "pictures from the source shards"
        )
    check_phashes(collection, meta)
    matching_index(collection, store)  # no index, or a stale one: said before any task runs
    done = _open_work(work, alive, meta.num_rows)
    rows_path = posixpath.join(work, "rows.parquet")
    if "rows.parquet" not in done:
        write_table(rows_path, C.rows_table(meta, alive))
    band_args = [
        (
            rows_path,
            posixpath.join(work, f"phash-{b:02d}.parquet"),
            shift,
            width,
            C.PHASH_MAX_DISTANCE,
            C.PHASH_PER_ROW,
            C.PHASH_MAX_SHARED,
        )
        for b, (shift, width) in enumerate(C.bands())
    ]
    knn_args = [
        (
            collection,
            rows_path,
            posixpath.join(work, f"knn-{p:05d}.parquet"),
            p,
            C.COPY_NEIGHBOURS,
            C.COPY_MIN_COSINE,
        )
        for p, arr in enumerate(store.arrays)
        if arr.shape[0]
    ]
    sketch_args = [
        (rows_path, posixpath.join(work, f"sketch-{t:05d}.parquet"), lo, lo + C.SKETCH_ROWS)
        for t, lo in enumerate(range(0, meta.num_rows, C.SKETCH_ROWS))
    ]
    sketch_files = [a[1] for a in sketch_args]
    local_args = [
        (sketch_files, posixpath.join(work, f"local-{b:02d}.parquet"), b, C.LOCAL_PARTITIONS)
        + (C.LOCAL_MAX_SHARED, C.LOCAL_PER_ROW)
        for b in range(C.LOCAL_PARTITIONS)
    ]
    _run_missing(run, C.band_pairs, band_args, done, 1)
    _run_missing(run, C.knn_pairs, knn_args, done, 2)
    try:
        _run_missing(run, sketch_rows, sketch_args, done, 1)
    except ShardOpenError as exc:
        raise CollectionError(
            f"{collection}: the copies level re-reads pictures from the source shards: {exc}"
        ) from exc
    _run_missing(run, C.local_pairs, local_args, done, 1)
    files = {
        C.SOURCE_PHASH: [a[1] for a in band_args],
        C.SOURCE_KNN: [a[2] for a in knn_args],
        C.SOURCE_LOCAL: [a[1] for a in local_args],
    }
    return done, files


def _open_work(work: str, alive: np.ndarray, n: int) -> set[str]:
    """Names of the files already in the work folder when it was made for these inputs (the
    alive rows, the collection size, the candidate and task parameters); otherwise the folder
    is emptied and stamped for them."""
    stamp = {
        "samples": n,
        "alive_sha256": hashlib.sha256(np.asarray(alive, np.int64).tobytes()).hexdigest(),
        "phash_max_distance": C.PHASH_MAX_DISTANCE,
        "phash_bound": [C.PHASH_PER_ROW, C.PHASH_MAX_SHARED],
        "neighbours": C.COPY_NEIGHBOURS,
        "min_cosine": C.COPY_MIN_COSINE,
        "pairs_per_task": C.PAIRS_PER_TASK,
        "local": [K.KEYPOINTS, K.PATCH_RADIUS, list(K.DOG_SIGMAS), K.MIN_RESPONSE, K.CELL_GRID],
        "local_cell_min_std": K.CELL_MIN_STD,
        "local_max_shared": C.LOCAL_MAX_SHARED,
        "local_per_row": C.LOCAL_PER_ROW,
        "sketch_rows": C.SKETCH_ROWS,
    }
    fs, path = url_to_fs(work)
    stamp_path = posixpath.join(work, "inputs.json")
    if read_json(stamp_path) == stamp:
        return {posixpath.basename(f) for f in fs.ls(path, detail=False)}
    if fs.exists(path):
        fs.rm(path, recursive=True)
    write_json(stamp_path, stamp)
    return set()


def _run_missing(
    run: Runner, fn: Callable[..., Any], args: list[tuple], done: set[str], out: int
) -> None:
    """Run the tasks whose output file (argument `out`) is not in `done`."""
    todo = [a for a in args if posixpath.basename(a[out]) not in done]
    if todo:
        run(fn, todo)


def _verified(work: str, tasks: int) -> np.ndarray:
    """(m, 2) verified pairs from the verdict files, in the plan's order."""
    out = []
    for t in range(tasks):
        fs, p = url_to_fs(C.verdict_file(work, t))
        with fs.open(p, "rb") as fh:
            table = pq.read_table(fh, filters=[("copy", "=", True)], columns=["i", "j"])
        out.append(np.stack([table.column(0).to_numpy(), table.column(1).to_numpy()], 1))
    return np.concatenate(out).astype(np.int64) if out else np.zeros((0, 2), np.int64)


def link_components(edges: np.ndarray, ranks: np.ndarray, links: Links, store: Any) -> int:
    """Link each connected group of verified pairs to its kept member (the best ranked): every
    other member's parent is a verified partner on a shortest path to it. Returns how many
    were linked."""
    if not len(edges):
        return 0
    nodes, flat = np.unique(edges, return_inverse=True)
    m = len(nodes)
    pairs = flat.reshape(-1, 2)
    _, label = connected_components(
        coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(m, m)),
        directed=False,
    )
    order = np.lexsort((ranks[nodes], label))  # per component, the best ranked first
    first = np.ones(m, bool)
    first[1:] = label[order][1:] != label[order][:-1]
    kept = order[first]
    # breadth first from a root joined to every kept member: parents lie on shortest paths
    rows = np.concatenate([pairs[:, 0], np.full(len(kept), m)])
    cols = np.concatenate([pairs[:, 1], kept])
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(m + 1, m + 1)).tocsr()
    _, pred = breadth_first_order(graph, m, directed=False, return_predecessors=True)
    children = np.setdiff1d(np.arange(m), kept)
    parents = pred[children]
    child_ids, parent_ids = nodes[children], nodes[parents]
    links.link(child_ids, parent_ids, S.REASON_COPY, cosine(store, child_ids, parent_ids))
    return len(children)


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
    links.link(ids[gone], nearest[gone], S.REASON_SEMANTIC, sims[gone])
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


def duplicate_rows(links: Links, keys: pa.Array | pa.ChunkedArray | np.ndarray) -> pa.Table:
    """The duplicates table: members of every group with more than one sample, groups numbered by
    their kept sample's position in the collection. A kept sample names its most similar direct
    child (the earliest among equals). Computed on arrays, the keys taken by Arrow: no Python
    object per sample."""
    if not isinstance(keys, (pa.Array, pa.ChunkedArray)):
        keys = pa.array(list(keys), pa.string())
    roots = links.roots()
    members = np.nonzero(links.parent >= 0)[0]
    kept_ids = np.unique(roots[members])
    rows = np.sort(np.concatenate([members, kept_ids]))
    is_kept = links.parent[rows] < 0
    parent = links.parent[members]
    by_parent = members[np.lexsort((members, -links.similarity[members], parent))]
    parents, first = np.unique(links.parent[by_parent], return_index=True)
    best = by_parent[first]  # per kept-or-linked parent (sorted), its best direct child
    partner = np.where(is_kept, 0, links.parent[rows])
    if is_kept.any():
        partner[is_kept] = best[np.searchsorted(parents, rows[is_kept])]
    # a kept row reports its best child's reason and similarity, a removed row its own
    source = np.where(is_kept, partner, rows)
    reasons = pa.array(S.DUP_REASONS, pa.string())
    return pa.table(
        {
            S.DUP_KEY: pc.take(keys, pa.array(rows, pa.int64())).cast(pa.string()),
            S.DUP_GROUP: pa.array(np.searchsorted(kept_ids, roots[rows]), pa.int64()),
            S.DUP_KEPT: pa.array(is_kept, pa.bool_()),
            S.DUP_REASON: pc.take(reasons, pa.array(links.reason[source], pa.int64())),
            S.DUP_NEAREST: pc.take(keys, pa.array(partner, pa.int64())).cast(pa.string()),
            S.DUP_SIMILARITY: pa.array(links.similarity[source], pa.float32()),
        }
    )
