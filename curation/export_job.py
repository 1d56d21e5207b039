"""The work behind `python -m curation.export`: resolve, plan the shards, skip what an earlier run
finished, run one Dask task per remaining shard, then write `manifest.json`.

The plan is the resolved rows cut into consecutive shards of `shard_size`. A shard is done when
its `_stats.json` holds the identity of its rows and options, so a rerun after a kill writes
only the missing shards, and writes them byte for byte as an uninterrupted run would. The
manifest is written last: an export without one is incomplete.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import replace
from typing import Any, Callable

import numpy as np
from distributed import Client

from collection import schema as S
from collection.cluster import SINGLE_THREAD_WORKER_ENV, each_completed, open_cluster
from collection.embeddings import EmbeddingStore
from collection.parts import CollectionError, missing_parts
from collection.sandbox import one_line
from collection.storage import (
    REMOTE_ERRORS,
    TMP_MARK,
    is_local,
    read_collection_json,
    read_json,
    url_to_fs,
    write_bytes,
    write_json,
)
from curation.export_shard import (
    ExportError,
    ExportOptions,
    json_columns,
    rows_schema,
    write_shard,
)
from curation.resolve import Resolution, resolve
from curation.spec import stable_hash
from models.runtime import cores, progress

log = logging.getLogger(__name__)

_OURS = re.compile(r"^(\d{5})(\.tar|\.parquet|_stats\.json)$")


def check_options(format: str, shard_size: int, image_size: int | None, resize: str | None) -> str:
    """The resize mode to use; ValueError naming the option when the combination cannot work."""
    if format not in S.EXPORT_FORMATS:
        raise ValueError(f"--format must be one of {', '.join(S.EXPORT_FORMATS)}, got {format!r}")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
    if image_size is not None and image_size < 1:
        raise ValueError(f"--image-size must be a positive number of pixels, got {image_size}")
    resize = resize or ("center_crop" if image_size else "none")
    if resize not in S.RESIZE_MODES:
        raise ValueError(f"--resize must be one of {', '.join(S.RESIZE_MODES)}, got {resize!r}")
    if resize != "none" and not image_size:
        raise ValueError(f"--resize {resize} needs --image-size")
    return resize


def check_writable(out: str) -> None:
    """Create `out` and write a probe file there: an unwritable --out fails before any work.

    On a remote store the top of the path (a bucket) must exist already: making one is not an
    export's decision, and a mistyped name should fail rather than appear.
    """
    fs, path = url_to_fs(out)
    probe = f"{out.rstrip('/')}/.sieve-write-probe"
    try:
        top = path.lstrip("/").split("/", 1)[0]
        if not is_local(out) and not fs.exists(top):
            raise ExportError(f"--out {out}: {top} does not exist; create it first")
        fs.makedirs(path, exist_ok=True)
        write_bytes(probe, b"")
        fs.rm(url_to_fs(probe)[1])
    except ExportError:
        raise
    except REMOTE_ERRORS as exc:
        raise ExportError(
            f"--out {out}: not writable ({type(exc).__name__}: {one_line(exc)})"
        ) from None


def shard_identity(opts: ExportOptions, ids: np.ndarray) -> str:
    """What a written shard must match to be reused: the options and exactly its rows."""
    rows = hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int64).tobytes()).hexdigest()
    return stable_hash({**opts.identity(), "ids": rows})


def _existing(out: str) -> tuple[dict[int, dict[str, Any]], dict[int, list[str]], list[str]]:
    """(stats by shard, our files by shard, leftover temporaries) already in `out`."""
    fs, path = url_to_fs(out)
    stats: dict[int, dict[str, Any]] = {}
    files: dict[int, list[str]] = {}
    temps = []
    fs.invalidate_cache(path)  # another process (a killed run, another machine) may have written
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:  # an object store has no empty folders: nothing written there yet
        names = []
    for name in names:
        base = name.rstrip("/").rsplit("/", 1)[-1]
        m = _OURS.match(base)
        if m:
            files.setdefault(int(m.group(1)), []).append(name)
            if m.group(2) == "_stats.json":
                doc = read_json(fs.unstrip_protocol(name) if "://" in out else name)
                if isinstance(doc, dict):
                    stats[int(m.group(1))] = doc
        elif TMP_MARK in base:
            final = base.split(TMP_MARK)[0]
            if _OURS.match(final) or final == S.EXPORT_MANIFEST:
                temps.append(name)  # a killed run's half-written file
    return stats, files, temps


def _prepare_out(
    out: str, spec_hash: str, n_shards: int, overwrite: bool, format: str
) -> dict[int, dict[str, Any]]:
    """Clear what cannot be reused (beyond the last shard, or of the other file format); return the
    stats of shards that may be. Refuses to mix specs."""
    fs, path = url_to_fs(out)
    stats, files, temps = _existing(out)
    hashes = {s.get("spec_hash") for s in stats.values()}
    if None in hashes and not overwrite:
        raise ExportError(
            f"--out {out} holds shards that are not a Sieve export (img2dataset's own output?); "
            f"use another --out"
        )
    other = sorted(h for h in hashes - {spec_hash} if h)
    if other and not overwrite:
        raise ExportError(
            f"--out {out} holds an export of another spec (spec_hash {other[0]}); "
            f"use another --out or --overwrite"
        )
    manifest = f"{path.rstrip('/')}/{S.EXPORT_MANIFEST}"
    doomed = list(temps) + ([manifest] if fs.exists(manifest) else [])
    other_ext = ".parquet" if format == S.EXPORT_WEBDATASET else ".tar"
    for i, names in files.items():
        if overwrite or i >= n_shards:
            doomed.extend(names)
            stats.pop(i, None)
        else:
            doomed.extend(n for n in names if n.endswith(other_ext))
    for name in doomed:
        fs.rm(name)
    return stats


#: what `on_progress` is told after each shard: shards done and in all, samples written, shards
#: failed
Progress = Callable[[dict[str, int]], None]


def _run(
    client: Client,
    tasks: list[tuple[int, np.ndarray, str]],
    opts: ExportOptions,
    on_progress: Progress | None = None,
    already: int = 0,
) -> dict[int, dict[str, Any]]:
    """One task per shard; a progress bar of shards, samples and samples/s; failures gathered."""
    args = [(i, ids, identity, opts) for i, ids, identity in tasks]
    done: dict[int, dict[str, Any]] = {}
    failed: dict[int, str] = {}
    samples, start = 0, time.time()
    with progress(total=len(tasks), desc="export shards", unit="shard") as bar:
        for outcome in each_completed(client, write_shard, args, "export"):
            i, exc = tasks[outcome.index][0], outcome.error
            if exc is None:
                done[i] = outcome.value
                samples += done[i]["count"]
            else:
                failed[i] = (
                    str(exc) if isinstance(exc, ExportError) else f"{type(exc).__name__}: {exc}"
                )
                log.error("shard %05d failed: %s", i, failed[i])
            bar.update(1)
            bar.set_postfix(
                samples=samples,
                samples_per_s=f"{samples / max(time.time() - start, 1e-9):.0f}",
                failed=len(failed),
            )
            if on_progress is not None:
                on_progress(
                    {
                        "shards_done": already + len(done) + len(failed),
                        "shards": already + len(tasks),
                        "samples": samples,
                        "failed": len(failed),
                    }
                )
    if failed:
        first = min(failed)
        raise ExportError(
            f"{len(failed)} of {len(tasks)} shard(s) failed; the others are written and a rerun "
            f"continues. Shard {first:05d}: {failed[first]}"
        )
    return done


def run_export(
    collection: str,
    spec: str | dict[str, Any],
    out: str,
    shard_size: int = 10_000,
    image_size: int | None = None,
    resize: str | None = None,
    format: str = S.EXPORT_WEBDATASET,
    scheduler: str | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    client: Client | None = None,
    resolution: Resolution | None = None,
    untrusted: bool = False,
    on_progress: Progress | None = None,
) -> dict[str, Any]:
    """`curation.export.export`'s work; returns the manifest."""
    resize = check_options(format, shard_size, image_size, resize)
    check_writable(out)
    try:
        problems = missing_parts(collection)
    except CollectionError as exc:
        raise ExportError(str(exc)) from None
    if problems:
        raise ExportError(
            f"{collection}: {'; '.join(problems)}: finish them with `python -m pipelines.embed` "
            f"(it resumes unfinished parts) before exporting"
        )
    # the export needs only the ids: every key as a Python string was ~1 GB of the driver at 10M
    res = resolution or resolve(collection, spec, untrusted=untrusted, keys=False)
    info = read_collection_json(collection)
    try:
        store = EmbeddingStore.open(collection, S.MODALITY_IMAGE)
    except CollectionError as exc:
        raise ExportError(str(exc)) from None
    opts = ExportOptions(
        collection,
        out.rstrip("/") or out,
        format,
        image_size,
        resize,
        res.spec_hash,
        parts=tuple(store.parts),
        offsets=tuple(int(o) for o in store.offsets),
    )
    if format != S.EXPORT_URLS:
        opts = replace(opts, embeddings=tuple(m for m in S.MODALITIES if _has(collection, m)))
    # the driver holds the resolved ids (8 bytes a row) and no row: each task reads its own
    ids = np.asarray(res.ids, dtype=np.int64)
    touched = np.unique(np.searchsorted(store.offsets, ids, side="right") - 1)
    opts = replace(opts, schema=rows_schema(collection, [store.parts[p] for p in touched]))
    n_shards = (len(ids) + shard_size - 1) // shard_size
    reusable = _prepare_out(out, res.spec_hash, n_shards, overwrite, format)
    tasks, done = [], {}
    for i in range(n_shards):
        # a copy, not a view: a pickled view would carry the whole array to the worker
        part = ids[i * shard_size : (i + 1) * shard_size].copy()
        identity = shard_identity(opts, part)
        if reusable.get(i, {}).get("identity") == identity and _shard_exists(out, i, format):
            done[i] = reusable[i]
        else:
            tasks.append((i, part, identity))
    log.info(
        "%d rows -> %d shards: %d to write, %d already written",
        len(ids),
        n_shards,
        len(tasks),
        len(done),
    )
    if on_progress is not None:
        on_progress({"shards_done": len(done), "shards": n_shards, "samples": 0, "failed": 0})
    if tasks:
        session = None
        if client is None:
            session = open_cluster(
                scheduler,
                workers or max(1, min(cores(), len(tasks))),
                worker_env=SINGLE_THREAD_WORKER_ENV,
            )
            client = session.client
        try:
            done.update(_run(client, tasks, opts, on_progress, len(done)))
        finally:
            if session is not None:
                session.close()  # the caller's environment is restored here too
    manifest = {
        S.MANIFEST_FORMAT: format,
        S.MANIFEST_SPEC: res.spec,
        S.MANIFEST_SPEC_HASH: res.spec_hash,
        S.MANIFEST_COLLECTION: collection,
        S.MANIFEST_COLLECTION_ID: res.collection_id,
        S.MANIFEST_CLIP_MODEL: info.get("clip_model"),
        S.MANIFEST_DIM: info.get("emb_dim"),
        S.MANIFEST_COUNT: sum(s["count"] for s in done.values()),
        S.MANIFEST_SHARDS: n_shards,
        "resolved": len(ids),
        "taken_down_at_export": sum(s.get("taken_down", 0) for s in done.values()),
        S.MANIFEST_MISSING: sum(len(s.get("missing", ())) for s in done.values()),
        S.MANIFEST_BYTES_FETCHED: sum(s.get(S.MANIFEST_BYTES_FETCHED, 0) for s in done.values()),
        S.MANIFEST_MEMBER_BYTES: sum(s.get(S.MANIFEST_MEMBER_BYTES, 0) for s in done.values()),
        "shard_size": shard_size,
        "image_size": image_size,
        "resize": resize,
        "embeddings": list(opts.embeddings),
        S.MANIFEST_COLUMNS: json_columns(opts.schema.names),
        S.MANIFEST_CREATED: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "schema_version": S.SCHEMA_VERSION,
    }
    write_json(f"{out.rstrip('/')}/{S.EXPORT_MANIFEST}", manifest)
    return manifest


def _has(collection: str, modality: str) -> bool:
    try:
        return EmbeddingStore.open(collection, modality).count > 0
    except CollectionError:
        return False


def _shard_exists(out: str, i: int, format: str) -> bool:
    ext = "tar" if format == S.EXPORT_WEBDATASET else "parquet"
    fs, path = url_to_fs(f"{out.rstrip('/')}/{S.shard_name(i, ext)}")
    return fs.exists(path)
