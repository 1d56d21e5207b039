"""The dedup levels' stages over one collection, each usable alone: exact (same sha256),
copies (candidate pairs from neighbours, verdicts from the pixels) and semantic (SemDeDup).

Each stage links removed samples to the sample that made them duplicates (`Links`); the
runner in `curation.dedup` chooses which stages run and writes the table `duplicate_rows` makes.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from collection import schema as S
from collection.parts import CollectionError
from collection.shards import ShardOpenError
from curation.copies import is_copy, phash_bits
from curation.pictures import load_thumbnails
from curation.semdedup import EPS_TABLE, SemanticParams, group_links, root_groups
from curation.vectors import neighbours

log = logging.getLogger(__name__)

#: image-embedding neighbours of each sample proposed as copy candidates, and their cosine floor
COPY_NEIGHBOURS = 10
COPY_MIN_COSINE = 0.5
#: perceptual-hash neighbours proposed as copy candidates, and their Hamming distance ceiling
PHASH_NEIGHBOURS = 10
PHASH_MAX_DISTANCE = 16
#: above this many vectors the perceptual-hash search uses an HNSW graph instead of brute force
PHASH_BRUTE_FORCE_MAX = 250_000

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


def cosine(store: Any, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Image-embedding cosine of each pair (a[i], b[i]): the similarity a duplicate row reports."""
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
    sims = cosine(store, np.array(children, np.int64), np.array(parents, np.int64))
    for c, p, s in zip(children, parents, sims):
        links.link(c, p, S.REASON_EXACT, float(s))
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
    check_phashes(collection, meta)
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
        for c, p, s in zip(children, parents, cosine(store, children, parents)):
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
