"""Generate an offline image–text dataset in img2dataset's webdataset output format.

`python -m pipelines.generate --out DIR --n N` writes `00000.tar` ({key}.jpg/.txt/.json),
`00000.parquet` (every row) and `00000_stats.json` per shard, deterministically per seed:
the demo, the tests and the bundled models all learn from this data, since nothing can be
downloaded here.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import tarfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from collection.schema import shard_name, stats_name
from collection.storage import atomic_path, write_json
from models.runtime import progress, setup_logging
from models.scenes import NOISE_TEXTURES, Sample, make_caption, make_sample, sample_key
from pipelines.near_duplicates import make_copy

log = logging.getLogger(__name__)
URL_TEMPLATE = "http://sample.sieve.invalid/{key}.jpg"  # .invalid never resolves: clearly synthetic


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _corrupt(data: bytes, rng: np.random.Generator) -> bytes:
    """Truncated JPEG bytes or plain garbage: what broken downloads look like."""
    if rng.random() < 0.5:
        return data[: max(16, int(len(data) * rng.uniform(0.2, 0.7)))]
    return rng.integers(0, 256, int(rng.integers(64, 2048)), dtype=np.uint8).tobytes()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = mtime
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def mismatched_caption(
    index: int,
    n: int,
    seed: int,
    shard_size: int,
    object_sizes: Sequence[str] | None,
    attrs: dict[str, Any],
) -> tuple[str, str]:
    """(caption, key) of another sample of the dataset to swap in for sample `index`: drawn per
    (seed, index), and naming another colour or shape, so the swapped caption is wrong about the
    image (a caption of a same-coloured, same-shaped scene would still describe it)."""
    rng = np.random.default_rng([seed, index, 2])
    other = None
    for _ in range(16):
        j = int(rng.integers(0, n - 1))
        j += j >= index  # any sample but this one
        # the caption only: rendering at 8 px costs a fraction of the real image
        other = make_sample(j, 8, seed, 0.0, shard_size, object_sizes)
        if (other.attrs["color"], other.attrs["shape"]) != (attrs["color"], attrs["shape"]):
            break
    assert other is not None
    return other.caption, other.key


def copy_of(index: int, seed: int, fraction: float) -> int | None:
    """The earlier sample that sample `index` is a planted copy of
    (never itself a copy), or None."""
    if fraction <= 0 or index == 0:
        return None
    rng = np.random.default_rng([seed, index, 4])
    if rng.random() >= fraction:
        return None
    while True:  # sample 0 is never a copy, so this ends
        original = int(rng.integers(0, index))
        if copy_of(original, seed, fraction) is None:
            return original


def planted_copy(
    index: int,
    original: int,
    size: int,
    seed: int,
    watermark_fraction: float,
    shard_size: int,
    object_sizes: Sequence[str] | None,
    noise_texture: str = "fine",
) -> tuple[Sample, bytes]:
    """Sample `index` as a transformed copy of sample `original`: (sample, JPEG bytes).

    Its caption is drawn afresh for the same scene (a re-upload has its own alt text); its json
    says `dup_of` (the original's key) and `transform`; an overlaid copy counts as watermarked.
    """
    source = make_sample(
        original, size, seed, watermark_fraction, shard_size, object_sizes, noise_texture
    )
    rng = np.random.default_rng([seed, index, 5])
    data, transform, _ = make_copy(_jpeg(source.image), rng)
    caption, named = make_caption(source.attrs, rng)
    attrs = {
        **source.attrs,
        "named": named,
        "dup_of": source.key,
        "transform": transform,
        "watermark": bool(source.attrs["watermark"] or transform == "overlaid"),
    }
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return Sample(sample_key(index, shard_size), image, caption, attrs), data


def write_shard(
    out: Path,
    shard: int,
    indices: range,
    size: int,
    seed: int,
    watermark_fraction: float,
    corrupt_fraction: float,
    shard_size: int,
    object_sizes: Sequence[str] | None = None,
    mismatch_fraction: float = 0.0,
    n: int | None = None,
    near_duplicate_fraction: float = 0.0,
    noise_texture: str = "fine",
) -> dict[str, Any]:
    """Write one shard's tar, parquet and stats (stats last: its presence marks completion).
    `n`: the dataset's size, which mismatched captions are drawn from
    (default: this shard's end)."""
    start = time.time()
    rows: list[dict[str, Any]] = []
    mtime = 1_700_000_000  # fixed, so shards are byte-identical per seed
    n = n if n is not None else indices.stop
    with (
        atomic_path(out / shard_name(shard)) as tmp,
        tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar,
    ):
        for index in indices:
            original = copy_of(index, seed, near_duplicate_fraction)
            if original is None:
                sample = make_sample(
                    index, size, seed, watermark_fraction, shard_size, object_sizes, noise_texture
                )
                copy_data = None
                if near_duplicate_fraction > 0:  # the columns exist only when copies may be planted
                    sample.attrs.update(dup_of=None, transform=None)
            else:
                sample, copy_data = planted_copy(
                    index,
                    original,
                    size,
                    seed,
                    watermark_fraction,
                    shard_size,
                    object_sizes,
                    noise_texture,
                )
            if (
                mismatch_fraction > 0
            ):  # only then: datasets without swaps stay byte-identical to before
                swap = (
                    n > 1 and np.random.default_rng([seed, index, 3]).random() < mismatch_fraction
                )
                sample.attrs["mismatched"], sample.attrs["caption_of"] = bool(swap), None
                if swap:  # the image keeps its true attributes; the caption is another sample's
                    sample.caption, sample.attrs["caption_of"] = mismatched_caption(
                        index, n, seed, shard_size, object_sizes, sample.attrs
                    )
            data = _jpeg(sample.image) if copy_data is None else copy_data
            crng = np.random.default_rng([seed, index, 1])
            if crng.random() < corrupt_fraction:
                data = _corrupt(data, crng)
                sample.attrs["corrupt"] = True
            row = {
                "url": URL_TEMPLATE.format(key=sample.key),
                "caption": sample.caption,
                "key": sample.key,
                "status": "success",
                "error_message": None,
                "width": sample.image.width,
                "height": sample.image.height,
                "original_width": sample.image.width,
                "original_height": sample.image.height,
                "exif": None,
                "sha256": hashlib.sha256(data).hexdigest(),
                **{k: v for k, v in sample.attrs.items()},
            }
            rows.append(row)
            _add_member(tar, f"{sample.key}.jpg", data, mtime)
            _add_member(tar, f"{sample.key}.txt", sample.caption.encode(), mtime)
            _add_member(tar, f"{sample.key}.json", json.dumps(row).encode(), mtime)
    with atomic_path(out / shard_name(shard, "parquet")) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
    stats = {
        "count": len(rows),
        "successes": len(rows),
        "failed_to_download": 0,
        "failed_to_resize": 0,
        "corrupt": sum(r["corrupt"] for r in rows),
        "watermarked": sum(r["watermark"] for r in rows),
        "mismatched": sum(bool(r.get("mismatched")) for r in rows),
        "near_duplicates": sum(r.get("dup_of") is not None for r in rows),
        "duration": time.time() - start,
        "start_time": start,
        "end_time": time.time(),
        "status_dict": {"success": len(rows)},
        "seed": seed,
        "size": size,
        "noise_texture": noise_texture,
    }
    write_json(out / stats_name(shard), stats)
    return stats


def write_sample_dataset(
    out: str | Path,
    n: int,
    size: int = 64,
    seed: int = 0,
    watermark_fraction: float = 0.1,
    corrupt_fraction: float = 0.0,
    shard_size: int = 1000,
    object_sizes: Sequence[str] | None = None,
    mismatch_fraction: float = 0.0,
    near_duplicate_fraction: float = 0.0,
    noise_texture: str = "fine",
) -> dict[str, Any]:
    """Write n generated samples as img2dataset webdataset shards under `out`; return totals.

    `mismatch_fraction` of the samples get another sample's caption (json: `mismatched`,
    `caption_of` = that sample's key): pairs the LAION similarity filter should remove.
    `near_duplicate_fraction` of the samples are transformed copies of earlier ones
    (`pipelines.near_duplicates`; json: `dup_of` = the original's key, `transform`).
    `noise_texture` picks the noisy backgrounds' texture (`models.scenes.NOISE_TEXTURES`)."""
    if n < 0 or shard_size < 1 or size < 8:
        raise ValueError(
            f"need n >= 0, shard_size >= 1 and size >= 8; got n={n}, "
            f"shard_size={shard_size}, size={size}"
        )
    for name, frac in (
        ("watermark_fraction", watermark_fraction),
        ("corrupt_fraction", corrupt_fraction),
        ("mismatch_fraction", mismatch_fraction),
        ("near_duplicate_fraction", near_duplicate_fraction),
    ):
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {frac}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    totals = {
        "count": 0,
        "corrupt": 0,
        "watermarked": 0,
        "mismatched": 0,
        "near_duplicates": 0,
        "shards": 0,
    }
    n_shards = (n + shard_size - 1) // shard_size
    for shard in progress(
        range(n_shards), desc="sample shards", unit="shard", disable=n_shards < 2
    ):
        indices = range(shard * shard_size, min(n, (shard + 1) * shard_size))
        stats = write_shard(
            out,
            shard,
            indices,
            size,
            seed,
            watermark_fraction,
            corrupt_fraction,
            shard_size,
            object_sizes,
            mismatch_fraction,
            n,
            near_duplicate_fraction,
            noise_texture,
        )
        for k in ("count", "corrupt", "watermarked", "mismatched", "near_duplicates"):
            totals[k] += stats[k]
        totals["shards"] += 1
    log.info("wrote %d samples in %d shards to %s", totals["count"], totals["shards"], out)
    return totals


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="output folder for the shards")
    parser.add_argument("--n", type=int, required=True, help="number of samples")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--watermark-fraction", type=float, default=0.1)
    parser.add_argument("--corrupt-fraction", type=float, default=0.0)
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument(
        "--mismatch-fraction",
        type=float,
        default=0.0,
        help="samples whose caption is swapped for another sample's (json: mismatched, caption_of)",
    )
    parser.add_argument(
        "--object-sizes",
        default=None,
        help="comma list of object sizes to draw from (small,medium,large; default all)",
    )
    parser.add_argument(
        "--near-duplicate-fraction",
        type=float,
        default=0.0,
        help="fraction of samples that are transformed copies of earlier ones (exact, re-encoded, "
        "resized, cropped, colour-shifted, overlaid); their json says dup_of and transform",
    )
    parser.add_argument(
        "--noise-texture",
        default="fine",
        choices=sorted(NOISE_TEXTURES),
        help="texture of noisy backgrounds: "
        "fine (per-pixel, what the bundled models learnt) or coarse",
    )
    args = parser.parse_args(argv)
    setup_logging()
    totals = write_sample_dataset(
        args.out,
        args.n,
        args.size,
        args.seed,
        args.watermark_fraction,
        args.corrupt_fraction,
        args.shard_size,
        args.object_sizes.split(",") if args.object_sizes else None,
        args.mismatch_fraction,
        args.near_duplicate_fraction,
        args.noise_texture,
    )
    print(json.dumps({"out": str(args.out), **totals}))


if __name__ == "__main__":
    main()
