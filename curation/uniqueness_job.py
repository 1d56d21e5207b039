"""The uniqueness job's `index` method: one task per part finds its vectors' k-th nearest
neighbour through the collection's index and writes (key, id, kth_distance); the driver ranks
every distance in DuckDB and streams `uniqueness.parquet` out in id order, holding no per-sample
array itself (`finish_job`, which the `lists` method, `curation.uniqueness_lists`, shares).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np
import pyarrow as pa

from collection import schema as S
from collection.embeddings import EmbeddingStore
from collection.parts import CollectionError
from collection.storage import file_signature
from curation.vector_jobs import (
    Runner,
    TaskFolder,
    check_parts,
    part_keys,
    part_params,
    scalar,
    stream_query,
    task_folder,
)
from curation.vectors import (
    check_index,
    load_collection_index,
    open_store,
    search_batch,
    search_depth,
)

log = logging.getLogger(__name__)

#: query vectors per index search inside a task
BATCH = 2048

SCHEMA = pa.schema(
    [
        pa.field(S.KEY, pa.string()),
        pa.field(S.ID, pa.int64()),
        pa.field(S.UNIQUENESS, pa.float32()),
        pa.field(S.KTH_DISTANCE, pa.float32()),
    ]
)


@functools.lru_cache(maxsize=1)
def _index(collection: str, modality: str, signature: Any) -> Any:
    """The collection's index, loaded once per worker process (and again when its file changes)."""
    return load_collection_index(collection, modality)[0]


def part_task(
    folder: TaskFolder, name: str, collection: str, modality: str, k: int, pos: int, depth: int
) -> dict[str, Any]:
    """One part's rows: key, id, kth_distance (1 - cosine to the k-th nearest other vector)."""
    store = EmbeddingStore.open(collection, modality)
    layout = S.CollectionLayout(collection)
    index = _index(collection, modality, file_signature(layout.index(modality)))
    if index.ntotal != store.count:
        raise CollectionError(
            f"{collection}: the {modality} index holds {index.ntotal} vectors but the collection "
            f"{store.count}; rebuild it with `python -m indices.build {collection}`"
        )
    start, rows, keys = part_keys(collection, store, pos)
    kth = np.empty(rows, np.float32)
    arr = store.arrays[pos]
    for lo in range(0, rows, BATCH):
        q = np.asarray(arr[lo : lo + BATCH], dtype=np.float32)
        _, sims = search_batch(index, store, q, start + lo, depth, k)
        if sims.shape[1] < k:  # fewer than k others: the k-th is missing
            sims = np.pad(sims, ((0, 0), (0, k - sims.shape[1])), constant_values=np.nan)
        # float16 copies can exceed cosine 1
        kth[lo : lo + len(q)] = np.maximum(1.0 - sims[:, k - 1], 0.0)
    folder.write(
        name,
        pa.table(
            {
                S.KEY: keys.cast(pa.string()),
                S.ID: pa.array(np.arange(start, start + rows), pa.int64()),
                S.KTH_DISTANCE: pa.array(kth, pa.float32()),
            }
        ),
    )
    return {"rows": rows}


def _ranked(n: int) -> Any:
    """The query that ranks kth_distance (ties share their mean rank, NaN is the rarest), scaled
    to [0, 1]: `curation.uniqueness.uniqueness_scores` in SQL."""
    d = f'CASE WHEN isnan("{S.KTH_DISTANCE}") THEN \'inf\'::FLOAT ELSE "{S.KTH_DISTANCE}" END'
    score = (
        "1.0::DOUBLE"
        if n < 2
        else f"(CAST(rank() OVER (ORDER BY d) - 1 AS DOUBLE) + "
        f"CAST(count(*) OVER (PARTITION BY d) - 1 AS DOUBLE) / 2.0) / {float(n - 1)!r}"
    )
    return lambda files: (
        f'SELECT "{S.KEY}", "{S.ID}", CAST({score} AS FLOAT) AS "{S.UNIQUENESS}", '
        f'"{S.KTH_DISTANCE}" FROM (SELECT *, {d} AS d FROM read_parquet({files})) '
        f'ORDER BY "{S.ID}"'
    )


def finish_job(folder: TaskFolder, names: list[str], n: int, path: str) -> dict[str, Any]:
    """The task outputs (key, id, kth_distance) of `n` rows ranked into `path` by DuckDB, the
    task folder removed; the row count and median k-th distance."""
    rows = stream_query(folder, names, _ranked(n), path, SCHEMA)
    median = scalar(
        folder,
        names,
        lambda files: (
            f'SELECT median("{S.KTH_DISTANCE}") FROM read_parquet({files}) '
            f'WHERE NOT isnan("{S.KTH_DISTANCE}")'
        ),
    )
    folder.remove()
    return {"samples": rows, "median_kth_distance": None if median is None else float(median)}


def uniqueness_job(
    collection: str,
    k: int,
    modality: str,
    path: str,
    scheduler: str | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Write `path` (uniqueness.parquet) through one index search task per part (the `index`
    method); return counts for the report."""
    check_parts(collection, modality)
    store = open_store(collection, modality)
    doc = check_index(collection, modality, store.count)
    depth = search_depth(doc, store.count, k)
    counts = np.diff(store.offsets).tolist()
    params = {"k": k, "modality": modality, **part_params(collection, counts)}
    folder = task_folder(path, params)
    names = [f"part_{n:05d}" for n in store.parts]
    args = [(collection, modality, k, pos, depth) for pos in range(len(store.parts))]
    with Runner(scheduler, workers) as runner:
        _, ran = runner.run(part_task, folder, names, args)
    done = finish_job(folder, names, store.count, path)
    return {
        **done,
        "method": "index",
        "tasks": len(names),
        "tasks_run": ran,
    }
