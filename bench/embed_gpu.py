"""`python -m bench.embed_gpu`: CLIP embedding speed on a CUDA GPU, bare forward and the embed job.

Parts (results in bench/results/embed_gpu.json):
- bare: open_clip ViT-B-32 (seeded random weights) through models.clip.Clip on preprocessed images
  and token ids already on the GPU, image + text tower per sample, batch 256: fp32, bf16 and
  bf16 + trim_text (`--settings`); samples/s (median of `--passes`), image and text tower rates
  apart, and mean/min per-sample cosine to the fp32 embeddings.
- pipeline: `pipelines.embed` on `--samples` generated `--image-size` px samples (default
  256, as img2dataset writes) in 4 shards, for ViT-B-32 (same random weights) and sieve-tiny
  (`--models`). Runs (`--runs`, from `PIPELINE_RUNS`): fp32 and bf16 on the default GPU
  cluster (a worker per 4 cores sharing the GPU, each decoding on its threads but one), and
  fp32 on one worker with its decode pool and with one decode thread, side by side
  (`layout_speedup_fp32`, `decode_pool_speedup_fp32`). Each: wall samples/s (the whole call:
  cluster start, model load, warm-up), steady samples/s (per worker, without start-up and
  model load), the share of the shards' time spent in the CLIP forward, cosine to fp32; and
  `vitb32_pipeline_fp32_vs_bare_fp32`, the job's fp32 rate over the bare fp32 forward.
Stops starting new measurements after `--budget-s` seconds (what was skipped is recorded).
`--device cpu` with small `--samples/--bare-samples` smoke-tests the script without a GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import embed as bench_embed
from bench.common import write_results
from models.clip import load_clip
from models.runtime import setup_logging
from models.scenes import iter_samples

log = logging.getLogger("bench.embed_gpu")
VITB32 = "open_clip:ViT-B-32"
TINY = "sieve-tiny"
#: name -> (precision, Clip speed options)
BARE_SETTINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "fp32": ("fp32", {"trim_text": False}),
    "bf16": ("bf16", {"trim_text": False}),
    "bf16_trim_text": ("bf16", {"trim_text": True}),
    "bf16_trim_text_channels_last": ("bf16", {"trim_text": True, "channels_last": True}),
}
DEFAULT_BARE = "fp32,bf16,bf16_trim_text"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _cos(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    c = np.einsum("ij,ij->i", a, b)
    return {"mean": round(float(c.mean()), 6), "min": round(float(c.min()), 6)}


def device_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": device,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=torch.cuda.get_device_name(0),
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_count=torch.cuda.device_count(),
            bf16_supported=torch.cuda.is_bf16_supported(),
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            tf32_cudnn=torch.backends.cudnn.allow_tf32,
        )
    return info


def bench_bare(
    spec: str, device: str, n: int, batch_size: int, passes: int, settings: list[str]
) -> dict[str, Any]:
    """models.clip.Clip on preloaded, preprocessed tensors on the device,
    one setting after another."""
    enc = load_clip(spec, device="cpu", batch_size=batch_size)
    samples = list(iter_samples(n, size=64, seed=1))
    images = torch.stack([enc.preprocess(s.image) for s in samples]).to(device)
    tokens = enc.tokenizer([s.caption for s in samples]).to(device)
    out: dict[str, Any] = {
        "model": VITB32 + " (random weights)",
        "samples": n,
        "batch_size": batch_size,
        "passes": passes,
        "image_shape": list(images.shape[1:]),
        "context_length": int(tokens.shape[1]),
        "settings": {},
    }
    ref: tuple[np.ndarray, np.ndarray] | None = None
    for name in settings:
        precision, opts = BARE_SETTINGS[name]
        # a copy of the fp32 CPU model under this setting, moved to the device
        clip = enc.variant(device=device, precision=precision, **opts)
        clip.encode_image_tensor(images[:batch_size])  # warm-up: kernels, allocator
        clip.encode_text_tokens(tokens[:batch_size])
        _sync(device)
        img_s, txt_s, rates = [], [], []
        embs: tuple[np.ndarray, np.ndarray] | None = None
        for p in range(passes):
            t0 = time.perf_counter()
            img = [
                clip.encode_image_tensor(images[i : i + batch_size])
                for i in range(0, n, batch_size)
            ]
            _sync(device)
            t1 = time.perf_counter()
            txt = [
                clip.encode_text_tokens(tokens[i : i + batch_size]) for i in range(0, n, batch_size)
            ]
            _sync(device)
            t2 = time.perf_counter()
            img_s.append(t1 - t0)
            txt_s.append(t2 - t1)
            rates.append(n / (t2 - t0))
            if p == 0:
                embs = (np.concatenate(img), np.concatenate(txt))
        assert embs is not None
        if ref is None:
            ref = embs
        out["settings"][name] = {
            "precision": precision,
            "options": opts,
            "weights_dtype": str(clip.dtype).replace("torch.", ""),
            "samples_per_s": round(statistics.median(rates), 1),
            "passes_samples_per_s": [round(r, 1) for r in rates],
            "image_samples_per_s": round(n / statistics.median(img_s), 1),
            "text_samples_per_s": round(n / statistics.median(txt_s), 1),
            "cosine_vs_fp32_image": _cos(embs[0], ref[0]),
            "cosine_vs_fp32_text": _cos(embs[1], ref[1]),
        }
        log.info("bare %s: %.1f samples/s", name, out["settings"][name]["samples_per_s"])
        del clip
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    base = out["settings"].get("fp32", {}).get("samples_per_s")
    for s in out["settings"].values():
        s["speedup_vs_fp32"] = round(s["samples_per_s"] / base, 3) if base else None
    return out


#: pipeline runs per model: name -> (precision, decode_threads, workers); None is the default
#: (a worker per 4 cores sharing the GPU, each decoding on its threads but one)
PIPELINE_RUNS: dict[str, tuple[str, int | None, int | None]] = {
    "fp32": ("fp32", None, None),
    "bf16": ("bf16", None, None),
    "fp32_w1": ("fp32", None, 1),
    "bf16_w1": ("bf16", None, 1),
    "fp32_w1_decode1": ("fp32", 1, 1),
    "fp32_w1_decode6": ("fp32", 6, 1),
    "fp32_w2": ("fp32", None, 2),
    "fp32_w4": ("fp32", None, 4),
    "bf16_w4": ("bf16", None, 4),
}
DEFAULT_RUNS = "fp32,bf16,fp32_w1,fp32_w1_decode1"
#: derived ratios: name -> (numerator run, denominator run)
RATIOS = {
    "layout_speedup_fp32": ("fp32", "fp32_w1"),
    "decode_pool_speedup_fp32": ("fp32_w1", "fp32_w1_decode1"),
}


def bench_pipeline(
    root: Path,
    models: dict[str, str],
    n: int,
    batch_size: int,
    device: str,
    deadline: float,
    image_size: int = 256,
    runs_wanted: list[str] | None = None,
) -> dict[str, Any]:
    data = bench_embed.dataset(n, root, shard_size=max(1, -(-n // 4)), size=image_size)
    results: dict[str, Any] = {
        "samples": n,
        "shards": 4,
        "image_size": image_size,
        "batch_size": batch_size,
    }
    for name, spec in models.items():
        runs: dict[str, Any] = {}
        ref = None
        for label in runs_wanted or list(PIPELINE_RUNS):
            precision, decoders, workers = PIPELINE_RUNS[label]
            if time.time() > deadline:
                runs[label] = "skipped: time budget"
                continue
            log.info("pipeline %s %s on %d samples", name, label, n)
            out = root / f"out-{name}-{label}"
            runs[label] = bench_embed.run_pipeline(
                data,
                out,
                spec,
                batch_size,
                precision,
                device=device,
                decode_threads=decoders,
                workers=workers,
            )
            img, txt = bench_embed._embeddings(out)
            if ref is None and precision == "fp32":
                ref = (img, txt)
            elif ref is not None:
                runs[label]["cosine_vs_fp32_image"] = _cos(img, ref[0])
                runs[label]["cosine_vs_fp32_text"] = _cos(txt, ref[1])
            shutil.rmtree(out, ignore_errors=True)
            log.info(
                "pipeline %s %s: %s samples/s steady, %s wall",
                name,
                label,
                runs[label]["steady_samples_per_s"],
                runs[label]["wall_samples_per_s"],
            )
        for ratio, (top, bottom) in RATIOS.items():
            a, b = runs.get(top), runs.get(bottom)
            if isinstance(a, dict) and isinstance(b, dict) and b["steady_samples_per_s"]:
                runs[ratio] = round(a["steady_samples_per_s"] / b["steady_samples_per_s"], 3)
        results[name] = runs
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.embed_gpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--bare-samples", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument(
        "--settings", default=DEFAULT_BARE, help=f"bare settings, from {','.join(BARE_SETTINGS)}"
    )
    parser.add_argument(
        "--samples", type=int, default=4096, help="generated samples for the pipeline part"
    )
    parser.add_argument("--models", default="vitb32,tiny", help="pipeline models: vitb32, tiny")
    parser.add_argument(
        "--runs",
        default=DEFAULT_RUNS,
        help=f"pipeline runs per model, from {','.join(PIPELINE_RUNS)}",
    )
    parser.add_argument(
        "--image-size", type=int, default=256, help="side of the generated images (px)"
    )
    parser.add_argument("--only", choices=("bare", "pipeline"), default=None)
    parser.add_argument(
        "--budget-s", type=float, default=150.0, help="start no new measurement after this"
    )
    parser.add_argument(
        "--workdir", default=os.path.join(tempfile.gettempdir(), "sieve-bench-embed-gpu")
    )
    parser.add_argument(
        "--no-save", action="store_true", help="print the results, do not write the json"
    )
    args = parser.parse_args(argv)
    setup_logging()
    start = time.time()
    deadline = start + args.budget_s
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(
            "bench.embed_gpu: CUDA is not available (use --device cpu for a smoke test)"
        )
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    spec = bench_embed.loadable_spec(root, VITB32)
    payload: dict[str, Any] = {"device_info": device_info(args.device)}
    if args.only in (None, "bare"):
        payload["bare"] = bench_bare(
            spec,
            args.device,
            args.bare_samples,
            args.batch_size,
            args.passes,
            [s for s in args.settings.split(",") if s],
        )
        bare = payload["bare"]["settings"]
        payload["bare_samples_per_s"] = {k: v["samples_per_s"] for k, v in bare.items()}
    if args.only in (None, "pipeline"):
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        models = {"vitb32": spec, "tiny": TINY}
        chosen = {k: models[k] for k in args.models.split(",") if k}
        payload["pipeline"] = bench_pipeline(
            root,
            chosen,
            args.samples,
            args.batch_size,
            args.device,
            deadline,
            args.image_size,
            [r for r in args.runs.split(",") if r],
        )
        payload["pipeline_steady_samples_per_s"] = {
            f"{m}_{p}": r["steady_samples_per_s"]
            for m in chosen
            for p, r in payload["pipeline"][m].items()
            if isinstance(r, dict)
        }
        bare_fp32 = payload.get("bare_samples_per_s", {}).get("fp32")
        steady = payload["pipeline_steady_samples_per_s"]
        if (
            bare_fp32 and "vitb32_fp32" in steady
        ):  # the GPU counterpart of the CPU pipeline_vs_bare_ratio
            payload["vitb32_pipeline_fp32_vs_bare_fp32"] = round(
                steady["vitb32_fp32"] / bare_fp32, 3
            )
    payload["elapsed_s"] = round(time.time() - start, 1)
    if args.no_save:
        print(json.dumps(payload, indent=2))
        return
    path = write_results("embed_gpu", payload)
    print(json.dumps({k: v for k, v in payload.items() if k not in ("bare", "pipeline")}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
