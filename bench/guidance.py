"""CLIP guidance benchmark: `python -m bench.guidance` → bench/results/guidance.json.

- win: on generated-scene prompts, for each generator (vqgan = the bundled sieve-vqgan, pixels,
  hdit = the demo run with its own CLIP conditioning, hdit_uncond = the same run guided by CLIP
  alone), the CLIP similarity of the guided output to its prompt against (a) the unguided output
  of the same seed and (b) the guided output of a random other prompt. `win_rate_vs_unguided` and
  `win_rate_vs_random_prompt` are judged by a second CLIP (sieve-tiny trained with another seed,
  in --work), so no generator is graded by the model it optimised against; `by_judge` has both.
- edit: scenes edited toward a prompt naming another colour: how often the prompt similarity
  rises, and how often the edit (with --init-weight) stays closer to the init image than the
  same edit without the init-weight term and than a generation from scratch; pixel distance
  (RMS; LPIPS needs downloaded VGG/AlexNet weights, which this machine cannot fetch).
- speed: guided steps per second per generator at 64².
- audit: `audit_copy_fraction`, the memorisation audit of the demo HDiT's samples against the
  demo collection.
Parts run separately (`--only`) merge into the same json.
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.common import write_results
from hdit_train.guide_diffusion import HDiTGuidance
from hdit_train.guide_runner import Guide, GuideSettings
from hdit_train.memorisation import audit, tensor_images
from hdit_train.sampling import sample_images
from models.cache import BUNDLED
from models.clip import Clip, load_clip
from models.runtime import setup_logging
from models.scenes import COLORS, make_sample

log = logging.getLogger(__name__)

PARTS = ("win", "edit", "speed", "audit")
GENERATORS = ("vqgan", "pixels", "hdit", "hdit_uncond")
#: the scenes' prompts come from this seed (held out from every bundled model's training seeds)
PROMPT_SEED = 4242
DEMO_PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star"]


def judge_clip(work: Path, steps: int | None) -> Clip:
    """The independent judge: sieve-tiny's recipe with seed 1,
    trained once into `work` (not the cache)."""
    bundled = BUNDLED["sieve-tiny"]
    knobs = {"seed": 1, **({"steps": steps} if steps else {})}
    folder = work / f"judge-sieve-tiny-seed1{'-steps' + str(steps) if steps else ''}"
    if bundled.trained_recipe(folder) != bundled.recipe(**knobs):
        bundled.train_into(folder, **knobs)
    return load_clip(f"local-dir:{folder}", device="cpu")


def prompts_for(n: int) -> list[str]:
    """n captions of generated scenes."""
    return [make_sample(i, seed=PROMPT_SEED).caption for i in range(n)]


def _settings(generator: str, steps: int, hdit_steps: int, cutn: int) -> GuideSettings:
    s = GuideSettings(steps=steps, cutn=cutn, hdit=HDiTGuidance(steps=hdit_steps))
    s.hdit.use_cond = generator != "hdit_uncond"
    return s


def _sims(judge: Clip, images: list[torch.Tensor], texts: list[str]) -> np.ndarray:
    """(images × texts) cosine similarities under `judge`."""
    pil = [
        Image.fromarray(im[0].clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy())
        for im in images
    ]
    return judge.encode_images(pil) @ judge.encode_texts(texts).T


def run_win(
    guides: dict[str, Guide],
    judges: dict[str, Clip],
    prompts: list[str],
    steps: int,
    hdit_steps: int,
    cutn: int,
) -> dict[str, Any]:
    rng = random.Random(0)
    others = [rng.choice([j for j in range(len(prompts)) if j != i]) for i in range(len(prompts))]
    by_judge: dict[str, dict[str, dict[str, float]]] = {
        j: {"vs_unguided": {}, "vs_random_prompt": {}} for j in judges
    }
    detail: dict[str, Any] = {}
    for name, g in guides.items():
        settings = _settings(name, steps, hdit_steps, cutn)
        guided, unguided = [], []
        for i, p in enumerate(prompts):
            log.info("win %s: prompt %d/%d %r", name, i + 1, len(prompts), p)
            guided.append(g.run(p, seed=i, settings=settings).image)
            unguided.append(g.run(p, seed=i, settings=settings, guided=False).image)
        for jname, judge in judges.items():
            s_g, s_u = _sims(judge, guided, prompts), _sims(judge, unguided, prompts)
            own = np.diag(s_g)
            vs_u = own > np.diag(s_u)
            vs_r = np.array([own[i] > s_g[others[i], i] for i in range(len(prompts))])
            by_judge[jname]["vs_unguided"][name] = round(float(vs_u.mean()), 3)
            by_judge[jname]["vs_random_prompt"][name] = round(float(vs_r.mean()), 3)
            detail.setdefault(name, {})[jname] = {
                "guided_similarity_mean": round(float(own.mean()), 4),
                "unguided_similarity_mean": round(float(np.diag(s_u).mean()), 4),
            }
    headline = "independent" if "independent" in judges else "guide"
    return {
        "win_rate_vs_unguided": by_judge[headline]["vs_unguided"],
        "win_rate_vs_random_prompt": by_judge[headline]["vs_random_prompt"],
        "win_judge": headline,
        "by_judge": by_judge,
        "win_detail": detail,
        "win_setup": {
            "prompts": len(prompts),
            "steps": steps,
            "hdit_steps": hdit_steps,
            "cutn": cutn,
            "random_prompt_pairs": others,
        },
    }


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


def run_edit(
    guides: dict[str, Guide],
    judge: Clip,
    n: int,
    steps: int,
    hdit_steps: int,
    cutn: int,
    init_weight: float,
    step_size: float,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "distance": "pixel RMS in [0, 1] units",
        "init_weight": init_weight,
        "edits": n,
        "steps": steps,
        "step_size": step_size,
    }
    names = list(COLORS)
    for name, g in guides.items():
        rises, closer_unanchored, closer_scratch, d_edit = [], [], [], []
        for i in range(n):
            scene = make_sample(i, seed=PROMPT_SEED + 1)
            colour = scene.attrs["color"]
            new = names[(names.index(colour) + 3) % len(names)]
            prompt = scene.caption.replace(colour, new, 1)
            size = g.default_size() if name.startswith("hdit") else (64, 64)
            init = scene.image.convert("RGB").resize((size[1], size[0]), Image.LANCZOS)
            start = torch.from_numpy(np.asarray(init, np.float32) / 255).permute(2, 0, 1)[None]
            anchored = _settings(name, steps, hdit_steps, cutn)
            loose = _settings(name, steps, hdit_steps, cutn)
            anchored.init_weight, anchored.step_size, loose.step_size = (
                init_weight,
                step_size,
                step_size,
            )
            edit = g.run(prompt, seed=i, size=size, init=init, settings=anchored).image
            free = g.run(prompt, seed=i, size=size, init=init, settings=loose).image
            scratch = g.run(prompt, seed=i, size=size, settings=loose).image
            sims = _sims(judge, [start, edit], [prompt])[:, 0]
            rises.append(sims[1] > sims[0])
            d = _rms(edit, start)
            d_edit.append(d)
            closer_unanchored.append(d < _rms(free, start))
            closer_scratch.append(d < _rms(scratch, start))
        out[name] = {
            "similarity_rise_rate": round(float(np.mean(rises)), 3),
            "closer_than_unanchored_edit_rate": round(float(np.mean(closer_unanchored)), 3),
            "closer_than_from_scratch_rate": round(float(np.mean(closer_scratch)), 3),
            "edit_distance_mean": round(float(np.mean(d_edit)), 4),
        }
    return {"edit": out}


def run_speed(guides: dict[str, Guide], steps: int, cutn: int) -> dict[str, Any]:
    out = {}
    for name, g in guides.items():
        settings = _settings(name, steps, steps, cutn)
        g.run(
            "a red circle",
            seed=0,
            size=64,
            settings=GuideSettings(steps=1, cutn=cutn, hdit=HDiTGuidance(steps=2)),
        )
        t = time.perf_counter()
        g.run("a red circle", seed=0, size=64, settings=settings)
        out[name] = round(steps / (time.perf_counter() - t), 3)
    return {
        "steps_per_second_64": out,
        "speed_setup": {
            "steps": steps,
            "cutn": cutn,
            "size": 64,
            "threads": torch.get_num_threads(),
        },
    }


def run_audit(run: str, collection: str, n: int, work: Path) -> dict[str, Any]:
    images = torch.cat(
        [
            sample_images(
                run,
                [p],
                n=n // len(DEMO_PROMPTS),
                steps=50,
                sampler="dpmpp_2m_sde",
                cfg=4.0,
                seed=k,
                sigma_max=20.0,
            )
            for k, p in enumerate(DEMO_PROMPTS)
        ]
    )
    result = audit(tensor_images(images), collection, out=work / "audit")
    return {
        "audit_copy_fraction": round(result.copy_fraction, 4),
        "audit_samples": len(images),
        "audit_nearest_similarity_mean": round(result.report["nearest_similarity_mean"], 4),
        "audit_rule": result.report["rule"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(
        prog="python -m bench.guidance",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma list of {PARTS}")
    ap.add_argument("--prompts", type=int, default=20, help="generated-scene prompts (win)")
    ap.add_argument("--steps", type=int, default=100, help="optimiser steps for vqgan and pixels")
    ap.add_argument("--hdit-steps", type=int, default=50, help="sampler steps for hdit")
    ap.add_argument("--cutn", type=int, default=16)
    ap.add_argument("--edits", type=int, default=10)
    ap.add_argument("--init-weight", type=float, default=1.0)
    ap.add_argument(
        "--edit-steps", type=int, default=30, help="optimiser steps of an edit (vqgan, pixels)"
    )
    ap.add_argument(
        "--edit-step-size",
        type=float,
        default=0.02,
        help="an edit's Adam step size (vqgan, pixels)",
    )
    ap.add_argument("--speed-steps", type=int, default=20)
    ap.add_argument("--audit-samples", type=int, default=64)
    ap.add_argument(
        "--hdit-run", default="demo/hdit", help="a trained run (make demo builds demo/hdit)"
    )
    ap.add_argument(
        "--collection", default="demo/collection", help="the collection the run was trained from"
    )
    ap.add_argument("--generators", default=",".join(GENERATORS))
    ap.add_argument(
        "--judge-steps",
        type=int,
        default=None,
        help="train the judge CLIP shorter (quick checks only)",
    )
    ap.add_argument(
        "--work", default="/tmp/sieve-guidance-bench", help="judge CLIP and audit report"
    )
    ap.add_argument(
        "--no-write", action="store_true", help="print the results instead of writing guidance.json"
    )
    args = ap.parse_args(argv)
    setup_logging()
    parts = [p for p in args.only.split(",") if p]
    bad = sorted(set(parts) - set(PARTS))
    if bad:
        ap.error(f"unknown parts {bad}; choose from {PARTS}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    needs_run = "audit" in parts or any(g.startswith("hdit") for g in args.generators.split(","))
    if needs_run and not (Path(args.hdit_run) / "state.json").exists():
        ap.error(f"--hdit-run {args.hdit_run}: no trained run there (run `make demo`, or pass one)")
    results: dict[str, Any] = {}
    if parts != ["audit"]:
        clip = load_clip("sieve-tiny", device="cpu")
        guides = {}
        for name in args.generators.split(","):
            kind = "hdit" if name.startswith("hdit") else name
            guides[name] = Guide(
                kind, clip, hdit_ckpt=args.hdit_run if kind == "hdit" else None, device="cpu"
            )
        judges = {"guide": clip}
        if "win" in parts or "edit" in parts:
            judges["independent"] = judge_clip(work, args.judge_steps)
        if "win" in parts:
            results.update(
                run_win(
                    guides,
                    judges,
                    prompts_for(args.prompts),
                    args.steps,
                    args.hdit_steps,
                    args.cutn,
                )
            )
        if "edit" in parts:
            results.update(
                run_edit(
                    guides,
                    judges["independent"],
                    args.edits,
                    args.edit_steps,
                    args.hdit_steps,
                    args.cutn,
                    args.init_weight,
                    args.edit_step_size,
                )
            )
        if "speed" in parts:
            results.update(run_speed(guides, args.speed_steps, args.cutn))
    if "audit" in parts:
        results.update(run_audit(args.hdit_run, args.collection, args.audit_samples, work))
    if args.no_write:
        print(results)
    else:
        print(write_results("guidance", results, merge=True))
    return results


if __name__ == "__main__":
    main()
