"""`python -m bench.embed`: pipelines.embed throughput vs the same model's bare forward.

Parts (run all, or one with `--only`; results merge into bench/results/embed.json):
- scale: sieve-tiny end to end at 1k / 10k / 100k generated samples (cost spread), then the
  10k run repeated between bare forwards (preloaded, preprocessed tensors, same batch size;
  the faster of one process on every core and one 1-thread process per core)
  -> pipeline_vs_bare_ratio, the median of the side-by-side ratios.
- vitb32: open_clip:ViT-B-32 (random weights) on 1k samples, per speed setting: samples/s,
  speedup_vs_fp32_bare and cosine_vs_fp32 (mean per-sample cosine to the fp32 embeddings;
  the headline keys are the fastest setting's). Settings: fp32 eager, channels_last,
  compile, trimmed text, bf16, int8 (dynamically quantized Linear layers).
Each pipeline run uses the default LocalCluster for this machine (on CPU: one single-thread
worker per core); the bare forward runs in this process on all cores. "steady" rates
exclude cluster start-up and model loading, "wall" rates don't.
Run it under `flock /tmp/sieve-cpu.lock` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import psutil
import torch

from bench.common import write_results
from collection import schema as S
from models.clip import load_clip
from models.int8 import int8_supported
from models.runtime import keep_freed_memory, setup_logging
from models.scenes import iter_samples
from models.specs import PRECISIONS
from models.speed import bf16_supported, cpu_has_amx
from pipelines.embed import embed
from pipelines.generate import write_sample_dataset

log = logging.getLogger("bench.embed")
TINY = "sieve-tiny"
SHARD_SIZE = 500
VITB32 = "open_clip:ViT-B-32"


def dataset(n: int, root: Path, shard_size: int = 1000, size: int = 64) -> Path:
    """Generated shards of n samples of `size` px under root (reused when already there)."""
    out = root / (f"data-{n}-s{shard_size}" + (f"-px{size}" if size != 64 else ""))
    last = out / S.stats_name((n - 1) // shard_size)
    if not last.exists():
        shutil.rmtree(out, ignore_errors=True)
        write_sample_dataset(
            out, n, size=size, seed=0, watermark_fraction=0.1, shard_size=shard_size
        )
    return out


def run_pipeline(
    data: Path,
    out: Path,
    clip_model: str,
    batch_size: int,
    precision: str = "fp32",
    clip_options: dict | None = None,
    device: str | None = None,
    decode_threads: int | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """One `embed` call (default cluster for this machine and `device`) on a fresh output.

    Wall rate: the whole call. Steady rate: each worker's samples over its own span (first
    task start to last task end, minus its model load and warm-up), summed over workers: what
    the cluster does per second once every worker is running. Workers start seconds apart on
    a cold machine, so one global span would count one worker's start-up as the other's
    processing time; that global figure is kept as `steady_global_samples_per_s`.
    """
    shutil.rmtree(out, ignore_errors=True)
    wait_until_quiet()
    t0 = time.time()
    summary = embed(
        str(data),
        str(out),
        clip_model=clip_model,
        batch_size=batch_size,
        precision=precision,
        clip_options=clip_options,
        device=device,
        decode_threads=decode_threads,
        workers=workers,
    )
    wall = time.time() - t0
    stats = [json.loads(p.read_text()) for p in (out / S.DONE_DIR).glob("*.json")]
    busy = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)
    load = max(s["model_load_s"] for s in stats)
    per_worker = {}
    for s in stats:
        per_worker.setdefault(s["worker"], []).append(s)
    steady = sum(
        sum(s["count"] for s in ws)
        / (
            max(s["end_time"] for s in ws)
            - min(s["start_time"] for s in ws)
            - sum(s["model_load_s"] for s in ws)
        )
        for ws in per_worker.values()
    )
    shard_s = sum(s["duration_s"] for s in stats)
    return {
        "samples": summary["count"],
        "ok": summary["ok"],
        "shards": len(stats),
        "wall_s": round(wall, 2),
        "workers": len({s["worker"] for s in stats}),
        "torch_threads": stats[0]["torch_threads"],
        "decode_threads": stats[0].get("decode_threads"),
        "startup_s": round(min(s["start_time"] for s in stats) - t0, 2),
        "model_load_s": round(load, 2),
        "wall_samples_per_s": round(summary["count"] / wall, 1),
        "steady_samples_per_s": round(steady, 1),
        "steady_global_samples_per_s": round(summary["count"] / (busy - load), 1),
        "clip_forward_share": round(sum(s["clip_forward_s"] for s in stats) / shard_s, 3)
        if shard_s
        else None,
    }


class BareModel:
    """The model alone, same settings, on image tensors and tokens already in memory.

    Prepared once (load, generate, preprocess, warm up) so it can be timed many times,
    between pipeline runs, without paying that set-up each time.
    """

    def __init__(
        self,
        clip_model: str,
        batch_size: int,
        threads: int,
        n: int,
        precision: str = "fp32",
        clip_options: dict | None = None,
    ):
        # the allocator setting the pipeline's workers run with (models/runtime.py): without it
        # the forward page-faults on every batch, and the reference would be slower than the model
        keep_freed_memory()
        torch.set_num_threads(threads)
        self.clip = load_clip(
            clip_model,
            device="cpu",
            batch_size=batch_size,
            precision=precision,
            **(clip_options or {}),
        )
        samples = list(iter_samples(n, size=64))
        self.images = torch.stack([self.clip.preprocess(s.image) for s in samples])
        self.tokens = self.clip.tokenizer([s.caption for s in samples])
        self.n, self.batch_size, self.threads = n, batch_size, threads
        self.info = {
            "samples": n,
            "batch_size": batch_size,
            "precision": precision,
            "options": clip_options or {},
            "torch_threads": torch.get_num_threads(),
        }
        self.clip.encode_image_tensor(self.images[:batch_size])  # warm-up (allocations, compile)
        self.clip.encode_text_tokens(self.tokens[:batch_size])

    def run(self, passes: int) -> list[float]:
        """Samples/s of each pass over the n samples."""
        rates = []
        for _ in range(passes):
            t0 = time.perf_counter()
            for i in range(0, self.n, self.batch_size):
                self.clip.encode_image_tensor(self.images[i : i + self.batch_size])
                self.clip.encode_text_tokens(self.tokens[i : i + self.batch_size])
            rates.append(self.n / (time.perf_counter() - t0))
        return rates


def _bare_child(args: tuple, start: Any, conn: Any) -> None:
    """A single-thread `BareModel` in its own process: on each command,
    wait for the siblings, run."""
    model = BareModel(*args)
    conn.send("ready")
    while (passes := conn.recv()) is not None:
        start.wait()
        conn.send(statistics.median(model.run(passes)))


class BarePool:
    """The model alone laid out as the pipeline lays it out: one 1-thread process per core.

    The processes stay up between measurements (idle on a pipe) and are timed together.
    """

    def __init__(
        self,
        clip_model: str,
        batch_size: int,
        processes: int,
        n: int,
        precision: str = "fp32",
        clip_options: dict | None = None,
    ):
        ctx = mp.get_context("spawn")
        start = ctx.Barrier(processes)
        self.conns, self.procs = [], []
        for _ in range(processes):
            here, there = ctx.Pipe()
            self.procs.append(
                ctx.Process(
                    target=_bare_child,
                    daemon=True,
                    args=((clip_model, batch_size, 1, n, precision, clip_options), start, there),
                )
            )
            self.conns.append(here)
        for p in self.procs:
            p.start()
        for c in self.conns:
            if c.recv() != "ready":
                raise RuntimeError("bare forward process failed to start")
        self.n, self.batch_size = n, batch_size

    def run(self, passes: int) -> dict[str, Any]:
        for c in self.conns:
            c.send(passes)
        rates = [round(c.recv(), 1) for c in self.conns]
        return {
            "samples": self.n,
            "batch_size": self.batch_size,
            "processes": len(rates),
            "torch_threads": 1,
            "samples_per_s": round(sum(rates), 1),
            "per_process_samples_per_s": rates,
        }

    def close(self) -> None:
        for c in self.conns:
            c.send(None)
        for p in self.procs:
            p.join(timeout=30)


def wait_until_quiet(limit_s: float = 60.0, busy_below: float = 0.15) -> float:
    """Wait until the machine is idle
    (under `busy_below` of its CPU for a second); return seconds waited.

    A LocalCluster's workers can still be exiting when `embed` returns; a bare forward timed
    beside them shares the cores with them and measures slow.
    """
    start = time.time()
    while time.time() - start < limit_s:
        if psutil.cpu_percent(interval=1.0) / 100 < busy_below:
            break
    return round(time.time() - start, 1)


def bare_reference(here: BareModel, pool: BarePool, passes: int = 2) -> dict[str, Any]:
    """The bare forward both ways (one process on every core; one 1-thread process per core).

    The faster is the reference: the pipeline is held to the best this machine does with the
    model alone, whichever layout that takes.
    """
    waited = wait_until_quiet()
    one = round(statistics.median(here.run(passes)), 1)
    per_core = pool.run(passes)
    return {
        "samples_per_s": max(one, per_core["samples_per_s"]),
        "one_process_samples_per_s": one,
        "process_per_core": per_core,
        "waited_for_quiet_s": waited,
    }


def _embeddings(out: Path) -> tuple[np.ndarray, np.ndarray]:
    layout = S.CollectionLayout(str(out))
    parts = sorted(int(p.stem) for p in (out / S.DONE_DIR).glob("*.json"))
    img = np.concatenate([np.load(layout.img_emb(i)) for i in parts]).astype(np.float32)
    txt = np.concatenate([np.load(layout.text_emb(i)) for i in parts]).astype(np.float32)
    return img, txt


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.einsum("ij,ij->i", a, b).mean())


def bench_scale(
    root: Path,
    sizes: list[int],
    batch_size: int,
    threads: int,
    model: str = TINY,
    precision: str = "fp32",
    ratio_repeats: int = 5,
) -> dict[str, Any]:
    """Cost per sample across sizes, then pipeline_vs_bare_ratio measured side by side.

    This machine's speed drifts over minutes (shared host; compare the entries of
    `bare_measurements` in bench/results/embed.json, `scale`), so the ratio is not one pipeline
    run against one bare run taken minutes apart: the 10k pipeline run is repeated, each run
    between two bare measurements, and each run is divided by the mean of its two neighbours.
    The figure is the median of those ratios.
    """
    spec = loadable_spec(root, model)
    runs = {}
    for n in sizes:
        # below 10k each worker gets one or two shards, too little work to average out one swing
        # of this machine's speed, so take the median of three runs
        reps = 3 if n < 10000 else 1
        log.info("%s pipeline on %d samples (%d run(s))", model, n, reps)
        tries = [
            run_pipeline(dataset(n, root, SHARD_SIZE), root / "out", spec, batch_size, precision)
            for _ in range(reps)
        ]
        runs[str(n)] = sorted(tries, key=lambda r: r["steady_samples_per_s"])[len(tries) // 2]
        runs[str(n)]["steady_samples_per_s_all"] = [r["steady_samples_per_s"] for r in tries]
    steady = {k: v["steady_samples_per_s"] for k, v in runs.items()}
    per_sample_ms = {k: 1000.0 / v for k, v in steady.items()}
    ref = 10000 if 10000 in sizes else max(sizes)
    mid = float(np.median(list(per_sample_ms.values())))
    bare_n = min(4096, max(sizes))
    here, pool = (
        BareModel(spec, batch_size, threads, bare_n, precision),
        BarePool(spec, batch_size, threads, bare_n),
    )
    bares = [bare_reference(here, pool)]
    pairs = []
    for i in range(ratio_repeats):
        log.info(
            "ratio run %d/%d: %d samples between two bare measurements", i + 1, ratio_repeats, ref
        )
        run = run_pipeline(
            dataset(ref, root, SHARD_SIZE), root / "out", spec, batch_size, precision
        )
        bares.append(bare_reference(here, pool))
        around = (bares[-2]["samples_per_s"] + bares[-1]["samples_per_s"]) / 2
        pairs.append(
            {
                "pipeline_samples_per_s": run["steady_samples_per_s"],
                "bare_samples_per_s_before_after": [
                    bares[-2]["samples_per_s"],
                    bares[-1]["samples_per_s"],
                ],
                "ratio": round(run["steady_samples_per_s"] / around, 3),
                "ratio_wall": round(run["wall_samples_per_s"] / around, 3),
                "run": run,
            }
        )
    pool.close()
    ratio = float(np.median([p["ratio"] for p in pairs]))
    return {
        "model": model + (" (random weights)" if spec != model else ""),
        "precision": precision,
        "batch_size": batch_size,
        "bare_torch_threads": threads,
        "shard_size": SHARD_SIZE,
        "samples_per_s": {k: v["wall_samples_per_s"] for k, v in runs.items()},
        "steady_samples_per_s": steady,
        "cost_per_sample_ms": {k: round(v, 3) for k, v in per_sample_ms.items()},
        "cost_spread_vs_median": round(max(abs(v / mid - 1) for v in per_sample_ms.values()), 3),
        "bare_samples_per_s": round(float(np.median([b["samples_per_s"] for b in bares])), 1),
        "pipeline_vs_bare_ratio": round(ratio, 3),
        "pipeline_vs_bare_ratios": [p["ratio"] for p in pairs],
        "pipeline_vs_bare_ratio_wall": float(np.median([p["ratio_wall"] for p in pairs])),
        "ratio_measured_at": ref,
        "ratio_runs": pairs,
        "runs": runs,
        "bare_measurements": bares,
    }


#: (name, precision, load_clip options, batch-size multiplier)
PLAIN = {"trim_text": False}
SETTINGS: list[tuple[str, str, dict[str, Any], int]] = [
    ("fp32_eager", "fp32", PLAIN, 1),
    ("fp32_channels_last", "fp32", {**PLAIN, "channels_last": True}, 1),
    ("fp32_compile", "fp32", {**PLAIN, "compile": True}, 1),
    ("fp32_trim_text", "fp32", {"trim_text": True}, 1),
    ("bf16", "bf16", PLAIN, 1),
    ("bf16_trim_text", "bf16", {"trim_text": True}, 1),
    ("bf16_trim_text_batch_x4", "bf16", {"trim_text": True}, 4),
    ("int8", "int8", PLAIN, 1),
    ("int8_trim_text", "int8", {"trim_text": True}, 1),
]


def loadable_spec(root: Path, model: str) -> str:
    """`model` itself, or for `open_clip:ARCH` (no weights) a checkpoint of seeded random weights,
    saved once so that every worker loads the same model."""
    if not model.startswith("open_clip:") or "/" in model:
        return model
    arch = model.split(":", 1)[1]
    path = root / f"{arch}-random-seed0.pt"
    if not path.exists():
        torch.manual_seed(0)
        torch.save(open_clip.create_model(arch).state_dict(), path)
    return f"{model}/{path}"


def bench_vitb32(
    root: Path,
    n: int,
    batch_size: int,
    threads: int,
    settings: list[str] | None,
    bare_samples: int = 256,
    model: str = VITB32,
) -> dict[str, Any]:
    """ViT-B-32 end to end per speed setting, each divided by fp32 bare forwards taken
    just before and after it.

    One bare measurement at the start would be minutes away from the later settings, and this
    machine's speed drifts in that time (bench/results/embed.json, `vitb32.fp32_bare_measurements`);
    the bare models stay loaded and are re-timed between settings instead. As in the scale part,
    the bare figure is the faster layout (one process on every core, or one 1-thread process per
    core as the pipeline runs).
    """
    data = dataset(n, root, shard_size=max(1, n // 4))  # 4 shards: every worker gets work
    spec = loadable_spec(root, model)
    here = BareModel(spec, batch_size, threads, bare_samples, "fp32", PLAIN)
    pool = BarePool(spec, batch_size, threads, bare_samples, "fp32", PLAIN)
    layouts = []

    def bare() -> float:
        layouts.append(bare_reference(here, pool, passes=1))
        return layouts[-1]["samples_per_s"]

    bares = [bare()]
    results: dict[str, Any] = {}
    ref_img = ref_txt = None
    for name, precision, options, mult in SETTINGS:
        if settings and name not in settings and name != "fp32_eager":
            continue
        log.info("ViT-B-32 pipeline, %s", name)
        out = root / f"out-vitb32-{name}"
        run = run_pipeline(data, out, spec, batch_size * mult, precision, options)
        bares.append(bare())
        around = (bares[-2] + bares[-1]) / 2
        img, txt = _embeddings(out)
        if ref_img is None:
            ref_img, ref_txt = img, txt
        cos_img, cos_txt = _mean_cosine(img, ref_img), _mean_cosine(txt, ref_txt)
        results[name] = {
            "precision": precision,
            "options": options,
            "batch_size": batch_size * mult,
            "samples_per_s": run["steady_samples_per_s"],
            "wall_samples_per_s": run["wall_samples_per_s"],
            "fp32_bare_samples_per_s_before_after": bares[-2:],
            "speedup_vs_fp32_bare": round(run["steady_samples_per_s"] / around, 3),
            "cosine_vs_fp32": round(min(cos_img, cos_txt), 5),
            "cosine_vs_fp32_image": round(cos_img, 5),
            "cosine_vs_fp32_text": round(cos_txt, 5),
            "run": run,
        }
        shutil.rmtree(out, ignore_errors=True)
    pool.close()
    best = max(results, key=lambda k: results[k]["speedup_vs_fp32_bare"])
    return {
        "model": model + (" (random weights)" if spec != model else ""),
        "samples": n,
        "bare_torch_threads": threads,
        "fp32_bare_samples_per_s": round(float(np.median(bares)), 1),
        "fp32_bare_measurements": bares,
        "bare": {
            **here.info,
            "samples_per_measurement": bare_samples,
            "passes": 1,
            "layouts": "the faster of one process on every core and one 1-thread process per core",
        },
        "bare_measurements": layouts,
        "cpu_bf16": {"mkldnn_bf16": bf16_supported("cpu"), "amx": cpu_has_amx()},
        "cpu_int8": {
            "engine": _int8_engine(),
            "supported": int8_supported("cpu"),
            "avx512_vnni": _cpu_flag("avx512_vnni"),
        },
        "settings": results,
        "best_setting": best,
        "speedup_vs_fp32_bare": results[best]["speedup_vs_fp32_bare"],
        "cosine_vs_fp32": results[best]["cosine_vs_fp32"],
    }


def _int8_engine() -> str:
    return str(torch.backends.quantized.engine)


def _cpu_flag(flag: str) -> bool | None:
    """Whether /proc/cpuinfo lists `flag` (None where there is no /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(flag in line.split() for line in f if line.startswith("flags"))
    except OSError:
        return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.embed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--only", choices=("scale", "vitb32"), default=None)
    parser.add_argument(
        "--sizes", default="1000,10000,100000", help="sample counts for the scale part"
    )
    parser.add_argument("--batch-size", type=int, default=256, help="batch size of the scale part")
    parser.add_argument(
        "--ratio-repeats",
        type=int,
        default=5,
        help="10k pipeline runs, each between two bare measurements",
    )
    parser.add_argument(
        "--scale-model",
        default=TINY,
        help="CLIP spec of the scale part (open_clip:ARCH without weights: seeded random weights)",
    )
    parser.add_argument("--scale-precision", default="fp32", choices=PRECISIONS)
    parser.add_argument(
        "--vit-model",
        default=VITB32,
        help="CLIP spec of the vitb32 part: open_clip:ARCH "
        "for seeded random weights, or real ones (e.g. open_clip:ViT-B-32/laion2b_s34b_b79k) "
        "to see each setting's cosine on trained weights",
    )
    parser.add_argument("--vit-batch-size", type=int, default=64, help="ViT-B-32 batch size")
    parser.add_argument("--vit-samples", type=int, default=1000)
    parser.add_argument("--settings", default=None, help="comma list of ViT-B-32 settings to run")
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="torch threads of the bare forward (the pipeline sizes its own cluster)",
    )
    parser.add_argument(
        "--workdir", default=os.path.join(tempfile.gettempdir(), "sieve-bench-embed")
    )
    args = parser.parse_args(argv)
    setup_logging()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {}
    if args.only in (None, "scale"):
        sizes = [int(s) for s in args.sizes.split(",")]
        payload["scale"] = bench_scale(
            root,
            sizes,
            args.batch_size,
            args.threads,
            args.scale_model,
            args.scale_precision,
            args.ratio_repeats,
        )
        for key in ("samples_per_s", "pipeline_vs_bare_ratio"):
            payload[key] = payload["scale"][key]
    if args.only in (None, "vitb32"):
        settings = args.settings.split(",") if args.settings else None
        payload["vitb32"] = bench_vitb32(
            root,
            args.vit_samples,
            args.vit_batch_size,
            args.threads,
            settings,
            model=args.vit_model,
        )
        for key in ("speedup_vs_fp32_bare", "cosine_vs_fp32"):
            payload[key] = payload["vitb32"][key]
    path = write_results("embed", payload, merge=True)
    print(
        json.dumps(
            {k: v for k, v in payload.items() if not isinstance(v, dict) or k == "samples_per_s"},
            indent=2,
        )
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
