"""CLIP-guided generation and editing:
`python -m hdit_train.guide --prompts "a red star:1|blurry:-0.5" --out out.png`.

VQGAN-CLIP (Crowson et al. 2022; nerdyrodent/VQGAN-CLIP's generate.py) steers a generator to
weighted prompts with no training: `text:weight:stop` separated by `|` (negative weights push
away), image prompts (`--image-prompts a.png:0.5`), augmented cutouts of the image
(`--cutn`, `--cut-pow`) scored by the spherical distance of their CLIP embeddings to the
prompts', Adam (`--step-size`). `--init IMAGE --init-weight W` edits an image: the generator
starts from it and W pulls back toward it.

Generators: `vqgan` (a taming-transformers VQGAN from `--vqgan-config model.yaml
--vqgan-ckpt last.ckpt`, or the bundled `sieve-vqgan`, trained on first use), `pixels` (no
weights: `--pixel-param raw|fourier|pyramid`) and `hdit` (CLIP-guided diffusion on a trained
run, `--hdit-ckpt RUN`: the CLIP loss of the denoised prediction steers every sampler step;
`--no-cond` leaves the run's own CLIP conditioning off). Several `--seed`s make a grid at
--out and one image per seed beside it; `--save-every K` writes every K-th step's frame.
The work is in `hdit_train.guide_runner`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

from models.runtime import setup_logging

log = logging.getLogger(__name__)


def guide(
    prompts: str | None = None,
    image_prompts: str | None = None,
    generator: str = "vqgan",
    out: str = "out.png",
    init: str | None = None,
    init_weight: float = 0.0,
    vqgan_config: str | None = None,
    vqgan_ckpt: str | None = None,
    hdit_ckpt: str | None = None,
    clip_model: str = "sieve-tiny",
    size: int | None = None,
    steps: int = 100,
    seed: Sequence[int] = (0,),
    save_every: int = 0,
    step_size: float | None = None,
    cutn: int = 16,
    cut_pow: float = 1.0,
    augment: bool = True,
    pixel_param: str = "fourier",
    clip_scale: float = 1000.0,
    tv_scale: float = 50.0,
    range_scale: float = 50.0,
    sampler: str = "dpmpp_2m_sde",
    cfg: float = 3.0,
    cond: bool = True,
    init_skip: float = 0.5,
    sigma_max: float = 20.0,
    device: str | None = None,
) -> Path:
    """Guide `generator` to the prompts for each seed; write the image
    (a grid for several seeds) to `out`."""
    # heavy (torch, CLIP): after argument parsing, so --help answers at once
    import torch

    from hdit_train.guide_diffusion import HDiTGuidance
    from hdit_train.guide_runner import Guide, GuideSettings, save_png
    from hdit_train.sampling import save_grid

    seeds = [int(s) for s in ([seed] if isinstance(seed, int) else seed)]
    if not seeds:
        raise ValueError("give at least one --seed")
    if steps < 0 or save_every < 0 or cutn < 1:
        raise ValueError("--steps and --save-every must be >= 0 and --cutn >= 1")
    settings = GuideSettings(
        steps,
        step_size,
        cutn,
        cut_pow,
        augment,
        init_weight,
        pixel_param,
        HDiTGuidance(
            steps,
            sampler,
            clip_scale,
            tv_scale,
            range_scale,
            init_weight,
            init_skip,
            cond,
            cfg,
            sigma_max=sigma_max,
        ),
    )
    g = Guide(generator, clip_model, vqgan_config, vqgan_ckpt, hdit_ckpt, device)
    out_path = Path(out)
    stem = out_path.with_suffix("")
    results = []
    for s in seeds:
        tag = f"seed{s}_" if len(seeds) > 1 else ""

        def frame(i: int, image, tag: str = tag) -> None:
            if save_every and i % save_every == 0:
                save_png(image, f"{stem}_frames/{tag}step{i:04d}.png")

        r = g.run(prompts, image_prompts, s, size, init, settings, on_step=frame)
        log.info(
            "seed %d: final loss %s, CLIP similarity to the prompts %.3f",
            s,
            f"{r.losses[-1]:.4f}" if r.losses else "-",
            r.similarity,
        )
        results.append(r)
        if len(seeds) > 1:
            save_png(r.image, f"{stem}_seed{s}{out_path.suffix or '.png'}")
    if len(seeds) > 1:
        return save_grid(torch.cat([r.image for r in results]) * 2 - 1, out_path)
    return save_png(results[0].image, out_path)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m hdit_train.guide",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--prompts",
        "-p",
        help='weighted text prompts, e.g. "a red star:1|blurry:-0.5" (text:weight:stop)',
    )
    ap.add_argument("--image-prompts", "-ip", help='weighted image prompts, e.g. "a.png:0.5|b.png"')
    ap.add_argument("--generator", default="vqgan", choices=["vqgan", "pixels", "hdit"])
    ap.add_argument("--out", "-o", default="out.png", help="output PNG (a grid when several seeds)")
    ap.add_argument("--init", help="image to edit: the generator starts from it")
    ap.add_argument(
        "--init-weight", type=float, default=0.0, help="pull back toward the init image (0 = none)"
    )
    ap.add_argument("--vqgan-config", help="taming model.yaml (default: the bundled sieve-vqgan)")
    ap.add_argument("--vqgan-ckpt", help="taming last.ckpt (Lightning checkpoint)")
    ap.add_argument("--hdit-ckpt", help="hdit_train run folder (generator hdit)")
    ap.add_argument(
        "--clip-model", default="sieve-tiny", help="CLIP spec that guides (default sieve-tiny)"
    )
    ap.add_argument(
        "--size", type=int, default=None, help="image side (default 64; hdit: the run's size)"
    )
    ap.add_argument(
        "--steps", "-i", type=int, default=100, help="optimiser steps (hdit: sampler steps)"
    )
    ap.add_argument(
        "--seed", "-s", type=int, nargs="+", default=[0], help="one or more seeds (several: a grid)"
    )
    ap.add_argument(
        "--save-every", type=int, default=0, help="write every K-th step's frame (0 = none)"
    )
    ap.add_argument(
        "--step-size",
        "-lr",
        type=float,
        default=None,
        help="Adam step size (default: vqgan 0.1, pixels 0.05)",
    )
    ap.add_argument("--cutn", type=int, default=16, help="cutouts per step")
    ap.add_argument(
        "--cut-pow", type=float, default=1.0, help="cutout size power (higher: smaller cutouts)"
    )
    ap.add_argument(
        "--no-augment", dest="augment", action="store_false", help="cutouts without augmentations"
    )
    ap.add_argument("--pixel-param", default="fourier", choices=["raw", "fourier", "pyramid"])
    hd = ap.add_argument_group("hdit (CLIP-guided diffusion)")
    hd.add_argument("--clip-scale", type=float, default=1000.0, help="CLIP loss gradient scale")
    hd.add_argument("--tv-scale", type=float, default=50.0, help="total variation scale")
    hd.add_argument("--range-scale", type=float, default=50.0, help="out-of-range penalty scale")
    hd.add_argument(
        "--sampler", default="dpmpp_2m_sde", choices=["euler", "heun", "dpmpp_2m", "dpmpp_2m_sde"]
    )
    hd.add_argument(
        "--cfg", type=float, default=3.0, help="classifier-free scale of the run's own conditioning"
    )
    hd.add_argument(
        "--no-cond", dest="cond", action="store_false", help="leave the run's CLIP conditioning off"
    )
    hd.add_argument(
        "--init-skip",
        type=float,
        default=0.5,
        help="fraction of the steps an edit skips (its noise level)",
    )
    hd.add_argument(
        "--sigma-max", type=float, default=20.0, help="noise level sampling starts from"
    )
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    return ap


def main(argv: list[str] | None = None) -> Path:
    """The command line: parse it, then `guide`."""
    ap = parser()
    args = ap.parse_args(argv)
    if not args.prompts and not args.image_prompts:
        ap.error("give --prompts and/or --image-prompts")
    setup_logging()
    try:
        out = guide(**vars(args))
    except (
        ValueError,
        FileNotFoundError,
    ) as exc:  # bad input (prompts, images, sizes, model files): one line naming it
        ap.exit(2, f"{ap.prog}: error: {exc}\n")
    print(out)
    return out


if __name__ == "__main__":
    main()
