"""`python -m bench.embed_stages`: per-sample cost of each reader stage of
pipelines.embed, one thread.

The pipeline keeps up with the model only if reading, decoding, hashing and preprocessing
cost a small fraction of the forward. This times each stage on one generated shard, the
pipeline's way beside the plain way it replaced, and the sieve-tiny forward for scale:
- tar: direct header parsing (`readers._tar_members`) vs `tarfile` streaming;
- decode: simplejpeg (libjpeg-turbo's TurboJPEG API) to a numpy array vs PIL, same pixels;
- phash: numpy thumbnails and one batched DCT per chunk vs PIL and a hash per image;
- tokenize: models.tokens vs open_clip's SimpleTokenizer, same ids;
- normalize and language (CLD3 per caption) as they are, for the total.
Run pinned for one-core figures:
`OMP_NUM_THREADS=1 taskset -c 0 python -m bench.embed_stages`.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from bench.common import write_results
from bench.embed import SHARD_SIZE, dataset
from collection import schema as S
from collection.shards import _tar_members, _tarfile_members, read_tar
from models.clip import load_clip
from models.preprocess import normalize_batch
from models.runtime import setup_logging
from pipelines.decode import DEFAULT_MAX_PIXELS, decode_pixels
from pipelines.language import detect_languages
from pipelines.phash import phash, phash_batch, thumbnails_of

log = logging.getLogger("bench.embed_stages")


def _best(fn: Callable[[], Any], n: int, reps: int) -> float:
    """Best-of-reps milliseconds per sample."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3 / n


def _pil_decode(data: bytes):
    """What decode_image did before the simplejpeg path (PIL for every format)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB") if img.mode != "RGB" else img


def measure(shard: Path, batch_size: int = 256, reps: int = 5) -> dict[str, Any]:
    """Per-sample milliseconds of each stage, new and plain, and the model forward."""
    url = str(shard)
    raws = list(read_tar(url))
    n = len(raws)
    images = [r.image for r in raws]
    pixels = [decode_pixels(b, DEFAULT_MAX_PIXELS)[0] for b in images]
    decoded = [_pil_decode(b) for b in images]
    arrays = pixels[:batch_size]
    clip = load_clip("sieve-tiny", batch_size=batch_size)
    _, mean, std = clip.prep.batched
    stages = {
        "tar": (
            lambda: list(_tar_members(open(url, "rb"), url)),
            lambda: list(_tarfile_members(open(url, "rb"), url)),
            n,
        ),
        "decode": (
            lambda: [decode_pixels(b, DEFAULT_MAX_PIXELS) for b in images],
            lambda: [_pil_decode(b) for b in images],
            n,
        ),
        "phash": (
            lambda: phash_batch(thumbnails_of(pixels)),
            lambda: [phash(im) for im in decoded],
            n,
        ),
    }
    captions = [r.caption for r in raws][:batch_size]
    stages["tokenize"] = (
        lambda: clip.tokenize(captions),
        lambda: clip.tokenizer(captions),
        len(captions),
    )
    rows = {}
    for name, (new, plain, count) in stages.items():
        rows[name] = {
            "pipeline_ms": round(_best(new, count, reps), 4),
            "plain_ms": round(_best(plain, count, reps), 4),
        }
        rows[name]["speedup"] = round(rows[name]["plain_ms"] / rows[name]["pipeline_ms"], 2)
    rows["normalize"] = {
        "pipeline_ms": round(
            _best(lambda: normalize_batch(arrays, mean, std), len(arrays), reps), 4
        )
    }
    caption_rows = [{S.CAPTION: c} for c in captions]
    rows["language"] = {
        "pipeline_ms": round(
            _best(lambda: detect_languages(caption_rows), len(caption_rows), reps), 4
        )
    }
    batch, tokens = normalize_batch(arrays, mean, std), clip.tokenize(captions)
    with torch.inference_mode():
        clip.encode_image_tensor(batch), clip.encode_text_tokens(tokens)
        model_ms = _best(
            lambda: (clip.encode_image_tensor(batch), clip.encode_text_tokens(tokens)),
            len(arrays),
            reps,
        )
    reader_new = sum(r["pipeline_ms"] for r in rows.values())
    reader_plain = sum(r.get("plain_ms", r["pipeline_ms"]) for r in rows.values())
    return {
        "shard": url,
        "samples": n,
        "batch_size": batch_size,
        "stages_ms_per_sample": rows,
        "reader_ms_per_sample": round(reader_new, 4),
        "reader_plain_ms_per_sample": round(reader_plain, 4),
        "model_ms_per_sample": round(model_ms, 4),
        "reader_over_model": round(reader_new / model_ms, 3),
        "reader_plain_over_model": round(reader_plain / model_ms, 3),
        "torch_threads": torch.get_num_threads(),
        "note": "reader = tar + decode + phash + normalize + "
        "tokenize + language per sample; sha256 and row "
        "building are left out (a few microseconds)",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.embed_stages",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (pin the process to match)"
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--workdir", default=os.path.join(tempfile.gettempdir(), "sieve-bench-embed")
    )
    args = parser.parse_args(argv)
    setup_logging()
    torch.set_num_threads(args.threads)
    data = dataset(SHARD_SIZE, Path(args.workdir), SHARD_SIZE)
    path = write_results("embed_stages", measure(data / "00000.tar", args.batch_size))
    print(path.read_text())


if __name__ == "__main__":
    main()
