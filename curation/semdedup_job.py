"""The semantic level run alone (`python -m curation.dedup --level semantic`) as a job whose
driver holds nothing per sample: it fits the root k-means on a sample (`curation.semdedup`);
one task per part assigns its rows to cluster groups and writes (id, key, group, keep-rule
columns) with one row group per cluster group; one task per cluster group reads its rows from
those files, runs `group_links`, applies ε and writes its duplicate rows (each removed sample's
chain ends inside its own leaf, so a group's kept samples are found in the group); DuckDB numbers
the groups and streams `duplicates.parquet` out in id order.
"""

from __future__ import annotations

import io
import logging
import math
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from collection import schema as S
from collection.embeddings import EmbeddingStore
from collection.parts import CollectionError, read_part_metadata
from collection.storage import url_to_fs, write_bytes, write_json
from curation.dedup_stages import keep_column
from curation.semdedup import EPS_TABLE, SemanticParams, assign, group_links, kmeans
from curation.vector_jobs import (
    Runner,
    TaskFolder,
    check_parts,
    part_params,
    stream_query,
    task_folder,
)
from curation.vectors import open_store, read_rows

log = logging.getLogger(__name__)

CENTROIDS = "centroids"
#: vectors assigned to their cluster group per faiss search
BATCH = 65536
GROUP = "group"
PIXELS, CLIP = "pixels", "clip"

SCHEMA = pa.schema(
    [
        pa.field(S.DUP_KEY, pa.string()),
        pa.field(S.DUP_GROUP, pa.int64()),
        pa.field(S.DUP_KEPT, pa.bool_()),
        pa.field(S.DUP_REASON, pa.string()),
        pa.field(S.DUP_NEAREST, pa.string()),
        pa.field(S.DUP_SIMILARITY, pa.float32()),
    ]
)


def _centroids_path(folder: TaskFolder) -> str:
    return folder.output(CENTROIDS).removesuffix(".parquet") + ".npy"


def assign_task(
    folder: TaskFolder, name: str, collection: str, pos: int, groups: int
) -> dict[str, Any]:
    """One part's rows with their cluster group and keep-rule columns, one row group per group."""
    store = EmbeddingStore.open(collection, S.MODALITY_IMAGE)
    part, start = store.parts[pos], int(store.offsets[pos])
    rows = int(store.offsets[pos + 1]) - start
    cols = [S.KEY, S.WIDTH, S.HEIGHT, S.CLIP_SIMILARITY]
    meta = read_part_metadata(collection, part, cols, ok_only=True)
    if meta.num_rows != rows:
        raise CollectionError(
            f"{S.CollectionLayout(collection).metadata(part)}: {meta.num_rows} embedded rows but "
            f"{rows} image vectors"
        )
    labels = np.zeros(rows, np.int64)
    if groups > 1:
        centroids = np.load(io.BytesIO(_read(_centroids_path(folder))))
        arr = store.arrays[pos]
        for lo in range(0, rows, BATCH):
            labels[lo : lo + BATCH] = assign(
                np.asarray(arr[lo : lo + BATCH], np.float32), centroids
            )
    table = pa.table(
        {
            S.ID: pa.array(np.arange(start, start + rows), pa.int64()),
            S.KEY: meta.column(S.KEY).cast(pa.string()),
            GROUP: pa.array(labels, pa.int64()),
            PIXELS: keep_column(meta, S.WIDTH, 0.0) * keep_column(meta, S.HEIGHT, 0.0),
            CLIP: keep_column(meta, S.CLIP_SIMILARITY, -1e9),
        }
    )
    order = np.argsort(labels, kind="stable")
    table = table.take(pa.array(order))
    sizes = np.bincount(labels, minlength=groups)
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, table.schema) as writer:
        at = 0
        for size in sizes[sizes > 0]:
            writer.write_table(table.slice(at, int(size)))
            at += int(size)
        if not rows:
            writer.write_table(table)
    write_bytes(folder.output(name), buf.getvalue())
    return {"rows": rows, "sizes": sizes.tolist()}


def _read(url: str) -> bytes:
    fs, p = url_to_fs(url)
    with fs.open(p, "rb") as fh:
        return fh.read()


def group_task(
    folder: TaskFolder,
    name: str,
    collection: str,
    group: int,
    parts: list[str],
    eps: float,
    params: SemanticParams,
) -> dict[str, Any]:
    """One cluster group: SemDeDup's links, and the duplicate rows ε makes of them (with the id
    of each row's kept sample, `root`)."""
    fs, _ = url_to_fs(folder.url)
    dataset = ds.dataset([url_to_fs(folder.output(p))[1] for p in parts], filesystem=fs)
    table = dataset.to_table(filter=ds.field(GROUP) == group)
    table = table.take(pc.sort_indices(table, [(S.ID, "ascending")]))
    ids = table.column(S.ID).to_numpy()
    keys = np.asarray(table.column(S.KEY).to_pylist(), dtype=object)
    order = np.lexsort(
        (ids, -table.column(CLIP).to_numpy(), -table.column(PIXELS).to_numpy())
    )  # the keep rule: most pixels, best clip_similarity, earliest
    ranks = np.empty(len(ids), np.int64)
    ranks[order] = np.arange(len(ids))
    _, sims, nearest = group_links((collection, S.MODALITY_IMAGE), ids, ranks, params)
    counts = {f"{e:g}": int((sims > 1.0 - e).sum()) for e in sorted(set(EPS_TABLE) | {eps})}
    gone = sims > 1.0 - eps
    parent = np.where(gone, np.searchsorted(ids, nearest), -1)
    root = np.where(parent >= 0, parent, np.arange(len(ids)))
    while True:  # pointer jumping: a removed row's chain ends at its leaf's kept row
        nxt = root[root]
        if np.array_equal(nxt, root):
            break
        root = nxt
    members = np.nonzero(gone)[0]
    kept = np.unique(root[members])
    # a kept row reports its most similar direct child (the earliest among equals)
    by_parent = members[np.lexsort((ids[members], -sims[members], parent[members]))]
    first = np.unique(parent[by_parent], return_index=True)
    best = dict(zip(first[0].tolist(), by_parent[first[1]].tolist()))
    rows = np.sort(np.concatenate([members, kept]))
    is_kept = ~gone[rows]
    partner = np.array(
        [best[int(r)] if k else int(parent[r]) for r, k in zip(rows, is_kept)], np.int64
    )
    folder.write(
        name,
        pa.table(
            {
                S.ID: pa.array(ids[rows], pa.int64()),
                S.DUP_KEY: pa.array(keys[rows].tolist(), pa.string()),
                "root": pa.array(ids[root[rows]], pa.int64()),
                S.DUP_KEPT: pa.array(is_kept, pa.bool_()),
                S.DUP_REASON: pa.array([S.REASON_SEMANTIC] * len(rows), pa.string()),
                S.DUP_NEAREST: pa.array(keys[partner].tolist() if len(rows) else [], pa.string()),
                S.DUP_SIMILARITY: pa.array(
                    np.where(is_kept, sims[partner], sims[rows]) if len(rows) else [], pa.float32()
                ),
            }
        ),
    )
    return {"removed": int(gone.sum()), "groups": int(len(kept)), "counts": counts}


def _groups_query(files: str) -> str:
    g = f'CAST(dense_rank() OVER (ORDER BY root) - 1 AS BIGINT) AS "{S.DUP_GROUP}"'
    cols = ", ".join(f'"{c}"' for c in (S.DUP_KEPT, S.DUP_REASON, S.DUP_NEAREST, S.DUP_SIMILARITY))
    return f'SELECT "{S.DUP_KEY}", {g}, {cols} FROM read_parquet({files}) ORDER BY "{S.ID}"'


def semantic_run(
    collection: str,
    eps: float,
    run: str,
    scheduler: str | None,
    workers: int | None,
    params: SemanticParams,
) -> dict[str, Any]:
    """SemDeDup alone on the whole collection: write dedup/{run}/duplicates.parquet and
    report.json (the keys `curation.dedup.dedup` writes) and return the report."""
    started = time.time()
    check_parts(collection, S.MODALITY_IMAGE)
    store = open_store(collection, S.MODALITY_IMAGE)
    n = store.count
    layout = S.InsightLayout(collection)
    path = layout.duplicates(run)
    job = {"eps": eps, "semantic": vars(params), **part_params(collection, np.diff(store.offsets))}
    folder = task_folder(path, job)
    k = math.ceil(n / params.group_size)
    if k > 1 and folder.result(CENTROIDS) is None:
        rng = np.random.default_rng(params.seed)
        # as `semdedup.root_groups` draws it, without materialising all n ids
        sample = np.sort(rng.choice(n, size=min(n, k * params.points_per_centroid), replace=False))
        buf = io.BytesIO()
        np.save(buf, kmeans(read_rows(store, sample), k, params))
        write_bytes(_centroids_path(folder), buf.getvalue())
        folder.finish(CENTROIDS, {"groups": k})
    parts = [f"assign_{p:05d}" for p in store.parts]
    t0 = time.time()
    with Runner(scheduler, workers) as runner:
        assigned, ran = runner.run(
            assign_task, folder, parts, [(collection, pos, k) for pos in range(len(parts))]
        )
        sizes = np.sum([a["sizes"] for a in assigned], axis=0) if k > 1 else np.array([n])
        groups = [int(g) for g in np.nonzero(sizes)[0]]
        names = [f"group_{g:05d}" for g in groups]
        results, ran_groups = runner.run(
            group_task, folder, names, [(collection, g, parts, eps, params) for g in groups]
        )
    rows = stream_query(folder, names, _groups_query, path, SCHEMA)
    folder.remove()
    removed = sum(r["removed"] for r in results)
    table = {
        e: round(sum(r["counts"][e] for r in results) / max(n, 1), 6)
        for e in (f"{e:g}" for e in sorted(set(EPS_TABLE) | {eps}))
    }
    report = {
        "collection": collection,
        "level": S.LEVEL_SEMANTIC,
        "levels": [S.LEVEL_SEMANTIC],
        "eps": eps,
        "run": run,
        "samples": n,
        "keep_rule": "most pixels, best clip_similarity, earliest",
        "semantic": {
            "cluster_groups": len(groups),
            "removed": removed,
            "removed_fraction_by_eps": table,
            "seconds": round(time.time() - t0, 3),
            "params": vars(params),
            "tasks": len(parts) + len(names),
            "tasks_run": ran + ran_groups,
        },
        "removed": removed,
        "removed_fraction": removed / max(n, 1),
        "removed_by_reason": {r: removed if r == S.REASON_SEMANTIC else 0 for r in S.DUP_REASONS},
        "groups": sum(r["groups"] for r in results),
        "seconds": round(time.time() - started, 3),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(layout.dedup_report(run), report)
    log.info(
        "%s: semantic removes %d of %d samples (%d rows) -> %s", collection, removed, n, rows, path
    )
    return report
