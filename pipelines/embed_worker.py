"""The Dask task: embed and score one input shard and commit it as one collection part.

On a GPU (or a multi-threaded CPU worker) a reader thread reads, decodes, hashes and
preprocesses the next batch while the calling thread runs the models on the current one, so
decoding hides behind inference; a single-thread CPU worker reads between batches instead
(`read_ahead`). On a GPU the reader hands decoding and resizing to a pool of threads
(`decode_threads`), since one thread decodes far slower than the GPU embeds.
Models live in a per-process cache keyed by their spec: a worker loads each model once and
reuses it for every shard it is given.
"""

from __future__ import annotations

import gc
import io
import logging
import os
import queue
import socket
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch
from distributed import get_worker
from PIL import Image

from collection import schema as S
from collection.shards import RawSample, Shard, read_shard
from models.clip import Clip, load_clip
from models.runtime import cores, keep_freed_memory
from pipelines.decode import DEFAULT_MAX_PIXELS, decode_sample, empty_row, finish_phashes
from pipelines.embed_writer import metadata_table, write_part
from pipelines.language import detect_languages
from pipelines.scorers import load_scorer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedConfig:
    """What a task needs to know; `identity()` is what makes a committed part reusable."""

    clip_model: str = "sieve-tiny"
    batch_size: int = 256
    scores: tuple[str, ...] = ()
    precision: str = "fp32"
    threads: int | None = None
    device: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    #: threads decoding and preprocessing images beside the reader; None: `decode_threads()` decides
    decode_threads: int | None = None
    #: extra keyword arguments for `load_clip` (speed settings such as channels_last, compile)
    clip_options: tuple[tuple[str, Any], ...] = field(default_factory=tuple)

    def identity(self) -> dict[str, Any]:
        """The settings whose change makes earlier parts stale (speed settings are not)."""
        return {
            "clip_model": self.clip_model,
            "scores": sorted(self.scores),
            "max_pixels": self.max_pixels,
        }


# ---- per-process model cache ------------------------------------------------------------
_CACHE: dict[tuple, Any] = {}
_CACHE_LOCK = threading.Lock()


def cached(key: tuple, factory: Callable[[], Any]) -> tuple[Any, bool]:
    """The object cached under `key` in this process, built once; returns (object, was_cached)."""
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key], True
        obj = factory()
        _CACHE[key] = obj
        return obj, False


def clear_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()


def device_normalises(clip: Clip) -> bool:
    """Whether the reader hands `clip` uint8 NHWC batches to normalise on its device.

    On a GPU the CPU-side normalisation of 224 px batches would cap the reader; a CPU worker
    normalises in the reader, off the forward's thread.
    """
    return clip.prep.batched is not None and not clip.device.startswith("cpu")


def stack(clip: Clip, items: list[Any]) -> torch.Tensor:
    """The batch the reader hands the model: uint8 NHWC for `device_normalises`, else float NCHW."""
    return clip.prep.stack(items, keep_uint8=device_normalises(clip))


#: samples in the warm-up batch: enough to load every kernel and thread pool once
WARM_UP_BATCH = 16


def warm_up(clip: Clip, batch_size: int = WARM_UP_BATCH) -> float:
    """Run one small batch through decode, preprocess, tokenizer and both towers; return seconds.

    The first batch of a process pays for lazy imports, kernel and thread-pool set-up. Paying
    it here, at load time, keeps it out of the first shard, so per-sample cost does not depend
    on how many shards a worker gets. The batch is small: a full one (256 samples of ViT-B-32
    on one core) cost half a minute that a small job never got back, while the allocator
    grows to a full batch's working set in the first real batch, doing real work.
    """
    start = time.time()
    side = clip.prep.batched[0] if clip.prep.batched is not None else 224
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (127, 64, 32)).save(buf, format="JPEG")
    captions = ["a warm-up caption"] * batch_size
    made: dict[str, Any] = {}

    def read_side() -> None:
        row, pixels = decode_sample(
            RawSample("warm-up", buf.getvalue(), captions[0]), "warm-up", defer_phash=True
        )
        finish_phashes([row])
        detect_languages([row])
        made["batch"] = stack(clip, [clip.prep.model_input(pixels)] * batch_size)
        made["tokens"] = clip.tokenize(captions)

    if read_ahead(clip, torch.get_num_threads()):  # the reader thread's malloc arena grows here
        reader = threading.Thread(target=read_side, name="warm-up-read")
        reader.start()
        reader.join()
    else:
        read_side()
    if "batch" not in made:
        raise RuntimeError("warm-up: the reader side failed (see the thread's traceback above)")
    clip.encode_image_tensor(made["batch"])
    clip.encode_text_tokens(made["tokens"])
    fsspec.filesystem("file")  # the reader's and writer's first use otherwise lands in shard one
    pq.write_table(
        metadata_table([empty_row(RawSample("warm-up", None, "x"), "warm-up")]), io.BytesIO()
    )
    return time.time() - start


def get_encoder(config: EmbedConfig) -> tuple[Clip, bool]:
    """The CLIP model under this config's speed settings, loaded
    (and warmed up) once per worker process."""

    def load() -> Clip:
        clip = load_clip(
            config.clip_model,
            device=config.device,
            batch_size=config.batch_size,
            precision=config.precision,
            **dict(config.clip_options),
        )
        log.info("warm-up: %.2f s", warm_up(clip))
        # the model, torch and every import are long-lived: keep them out of the cyclic GC, whose
        # full passes over them cost a visible pause inside a shard
        # (seen in the first shard's tokenizer)
        gc.collect()
        gc.freeze()
        return clip

    return cached(
        ("clip", config.clip_model, config.device, config.precision, config.clip_options), load
    )


def get_scorer(name: str, device: str | None = None) -> Any:
    """A scorer from `pipelines.scorers`, loaded once per worker process."""

    def load() -> Any:
        # one ONNX session per worker sized like the worker, not one using every core per worker
        opts = {"threads": torch.get_num_threads()} if name == "nsfw" else {}
        return load_scorer(name, **opts)

    return cached(("scorer", name, device), load)[0]


def _task_slots() -> int:
    """How many tasks this worker process runs at once (its Dask thread count)."""
    try:
        return max(1, get_worker().state.nthreads)
    except (ValueError, AttributeError):  # not inside a Dask worker
        return 1


def set_threads(threads: int | None) -> int:
    """Give torch `threads` intra-op threads (default: this machine's cores per task slot).

    Dask's nanny starts workers with OMP_NUM_THREADS=1, so without this a worker would
    run the model on one core whatever the machine has.
    """
    threads = threads or max(1, cores() // _task_slots())
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


# ---- the reader thread ------------------------------------------------------------------
@dataclass
class Chunk:
    """Consecutive rows of a shard holding up to one batch of usable (ok) samples."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    ok_rows: list[int] = field(default_factory=list)
    #: per usable sample: a preprocessed CHW tensor, or an HWC uint8 array for the batched path
    tensors: list[Any] = field(default_factory=list)
    batch: Any = None
    images: list[Any] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    tokens: Any = None


_END = object()


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def decode_threads(clip: Clip, threads: int, requested: int | None = None) -> int:
    """How many threads decode and preprocess images (1: the reader itself, no pool).

    On a GPU one reader thread cannot keep up: an H200 forwards ViT-B-32 many times faster than
    one thread decodes and resizes (bench/results/embed_gpu.json, `pipeline_decode_pool`). JPEG
    decoding (simplejpeg) and PIL's resize release the GIL, so threads scale; a GPU worker gets
    one per torch thread but one. A CPU worker's cores are busy with its own forward, so it keeps
    the single reader.
    """
    if requested is not None:
        if requested < 1:
            raise ValueError(f"decode_threads must be >= 1, got {requested}")
        return requested
    return max(1, threads - 1) if not clip.device.startswith("cpu") else 1


def _decode_one(
    raw: Any, url: str, config: EmbedConfig, clip: Clip, defer_phash: bool = True
) -> tuple[dict, Any, Any]:
    """(row, model input or None, pixels or None) for one raw sample;
    a preprocess failure is a status."""
    row, pixels = decode_sample(raw, url, config.max_pixels, defer_phash=defer_phash)
    if pixels is None:
        return row, None, None
    try:
        return row, clip.prep.model_input(pixels), pixels
    except (OSError, ValueError, RuntimeError) as exc:
        row[S.STATUS], row[S.ERROR] = S.STATUS_DECODE_ERROR, f"preprocess: {exc}"
        return row, None, None


def _decoded(shard: Shard, config: EmbedConfig, clip: Clip, threads: int):
    """`_decode_one` of every sample of the shard, in shard order, by `threads` threads.

    The pool also hashes each image: batched phash thumbnails (cheapest per image on one
    thread) would leave the reader the hashing of every large image, which then caps the pool.
    """
    if threads <= 1:
        for raw in read_shard(shard):
            yield _decode_one(raw, shard.url, config, clip)
        return
    # samples in flight: bounded, so a shard of large images is never all in memory
    window = 4 * threads
    pending: deque = deque()
    with ThreadPoolExecutor(threads, thread_name_prefix=f"decode-{shard.name}") as pool:
        try:
            for raw in read_shard(shard):
                pending.append(pool.submit(_decode_one, raw, shard.url, config, clip, False))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _read_chunks(
    shard: Shard, config: EmbedConfig, clip: Clip, keep_images: bool, threads: int = 1
):
    """Read, decode, preprocess and tokenize the shard into chunks of up to
    one batch of usable samples."""

    def ready(chunk: Chunk) -> Chunk:
        finish_phashes(chunk.rows)
        # on the reader's side: off the forward's path where it overlaps
        detect_languages(chunk.rows)
        if chunk.captions:
            chunk.tokens = clip.tokenize(chunk.captions)
            chunk.batch = stack(clip, chunk.tensors)
            chunk.tensors = []
        return chunk

    chunk = Chunk()
    for row, tensor, pixels in _decoded(shard, config, clip, threads):
        chunk.rows.append(row)
        if tensor is None:
            continue
        chunk.ok_rows.append(len(chunk.rows) - 1)
        chunk.tensors.append(tensor)
        chunk.captions.append(row[S.CAPTION])
        if keep_images:
            chunk.images.append(Image.fromarray(pixels, "RGB"))
        if len(chunk.ok_rows) >= config.batch_size:
            yield ready(chunk)
            chunk = Chunk()
    if chunk.rows:
        yield ready(chunk)


def _produce(
    shard: Shard,
    config: EmbedConfig,
    clip: Clip,
    keep_images: bool,
    q: queue.Queue,
    stop: threading.Event,
    threads: int = 1,
) -> None:
    """The reader thread: `_read_chunks` into the queue; errors travel through the queue."""
    try:
        for chunk in _read_chunks(shard, config, clip, keep_images, threads):
            if not _put(q, chunk, stop) or stop.is_set():
                return
        _put(q, _END, stop)
    except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread, which re-raises
        _put(q, exc, stop)


def read_ahead(clip: Clip, threads: int) -> bool:
    """Whether to read in a thread beside the model, or between its batches.

    A thread pays where the model leaves a resource idle: a GPU, or a CPU worker with several
    torch threads (whose team would otherwise wait on decoding). A single-thread CPU worker,
    the default layout (one per core), has nothing to overlap with: a reader thread there only
    interleaves with the forward on the same core, which cost the forward more CPU (evicted
    caches) and the pipeline throughput (measured side by side with `python -m bench.embed`).
    """
    return not clip.device.startswith("cpu") or threads > 1


def _chunks(
    shard: Shard,
    config: EmbedConfig,
    clip: Clip,
    keep_images: bool,
    ahead: bool = True,
    threads: int = 1,
):
    """The shard's chunks, read ahead by a thread (errors re-raised here) or
    inline; `threads` decode."""
    if not ahead:
        yield from _read_chunks(shard, config, clip, keep_images, threads)
        return
    q: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()
    thread = threading.Thread(
        target=_produce,
        name=f"read-{shard.name}",
        daemon=True,
        args=(shard, config, clip, keep_images, q, stop, threads),
    )
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=30)


def worker_device(device: str | None) -> str | None:
    """The device this worker uses: with several GPUs visible,
    LocalCluster worker i takes GPU i mod count.

    Workers that each see one GPU (dask-cuda's LocalCUDACluster sets CUDA_VISIBLE_DEVICES
    per worker) and any explicit device index keep `device` as given.
    """
    if device not in (None, "cuda"):
        return device
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return device
    try:
        name = get_worker().name
    except ValueError:  # not inside a Dask worker
        return device
    if isinstance(name, str) and name.isdigit():
        name = int(name)
    return f"cuda:{name % torch.cuda.device_count()}" if isinstance(name, int) else device


def prepare(config: EmbedConfig) -> tuple[Clip, list[Any], int, bool]:
    """Set this worker up for `config`: allocator, threads, models (loaded once per process).

    Returns (encoder, scorers, torch threads, whether the encoder was already loaded). `embed`
    runs it once on every LocalCluster worker before the first shard, so no worker's model
    load overlaps another worker's shards.
    """
    keep_freed_memory()  # Dask's nanny froze glibc's mmap threshold at 128 KiB (models/runtime.py)
    config = replace(config, device=worker_device(config.device))
    threads = set_threads(config.threads)
    encoder, cache_hit = get_encoder(config)
    scorers = [get_scorer(name, config.device) for name in config.scores]
    return encoder, scorers, threads, cache_hit


def process_shard(
    shard: Shard, output: str, config: EmbedConfig, input_fingerprint: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Embed and score every sample of `shard`, commit part `shard.index`, return its stats."""
    start = time.time()
    encoder, scorers, threads, cache_hit = prepare(config)
    load_s = time.time() - start
    keep_images = any(s.kind == "image" for s in scorers)
    n = shard.index
    rows: list[dict[str, Any]] = []
    img_parts: list[np.ndarray] = []
    text_parts: list[np.ndarray] = []
    n_ok = 0
    model_s = 0.0
    decoders = decode_threads(encoder, threads, config.decode_threads)
    for chunk in _chunks(
        shard, config, encoder, keep_images, read_ahead(encoder, threads), decoders
    ):
        if chunk.ok_rows:
            t_model = time.perf_counter()
            img = encoder.encode_image_tensor(chunk.batch)
            txt = encoder.encode_text_tokens(chunk.tokens)
            model_s += time.perf_counter() - t_model
            sims = np.einsum("ij,ij->i", img, txt)
            columns = {S.CLIP_SIMILARITY: sims}
            for scorer in scorers:
                items = chunk.images if scorer.kind == "image" else chunk.captions
                extra = {"embeddings": img} if getattr(scorer, "needs_embeddings", False) else {}
                columns[scorer.column] = np.asarray(scorer.score(items, **extra), dtype=np.float32)
            for j, i in enumerate(chunk.ok_rows):
                row = chunk.rows[i]
                row[S.EMB_ROW] = n_ok + j
                for name, values in columns.items():
                    row[name] = float(values[j])
            n_ok += len(chunk.ok_rows)
            img_parts.append(img.astype(S.EMB_DTYPE))
            text_parts.append(txt.astype(S.EMB_DTYPE))
        for row in chunk.rows:
            row[S.PART], row[S.ROW] = n, len(rows)
            rows.append(row)
    dim = encoder.dim
    img_emb = np.concatenate(img_parts) if img_parts else np.zeros((0, dim), S.EMB_DTYPE)
    text_emb = np.concatenate(text_parts) if text_parts else np.zeros((0, dim), S.EMB_DTYPE)
    duration = time.time() - start
    stats = {
        "part": n,
        "source_shard": shard.url,
        "input_format": shard.format,
        "input_fingerprint": input_fingerprint,
        "config": config.identity(),
        "count": len(rows),
        "ok": n_ok,
        "status_counts": dict(Counter(r[S.STATUS] for r in rows)),
        "emb_dim": dim,
        "precision": config.precision,
        "batch_size": config.batch_size,
        "torch_threads": threads,
        "decode_threads": decoders,
        "model_cache_hit": cache_hit,
        "model_load_s": load_s,
        "worker": f"{socket.gethostname()}:{os.getpid()}",
        "start_time": start,
        "end_time": time.time(),
        "duration_s": duration,
        "samples_per_s": len(rows) / duration if duration > 0 else None,
        #: wall seconds inside the CLIP forward; the rest of duration_s is
        #: reading, scoring and writing
        "clip_forward_s": model_s,
    }
    write_part(output, n, rows, img_emb, text_emb, stats)
    log.info(
        "part %d (%s): %d samples, %d ok, %.1f samples/s",
        n,
        shard.name,
        len(rows),
        n_ok,
        stats["samples_per_s"] or 0.0,
    )
    return stats
