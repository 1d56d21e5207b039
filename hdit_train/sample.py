"""Sample from a trained run:
`python -m hdit_train.sample --ckpt RUN --prompt "..." --out grid.png`.

Prompts are embedded with the CLIP text tower of the model named in the run; `--class N`
picks a class of a class-conditioned run. Guidance is classifier-free. `--audit COLL` then
runs the memorisation audit of the samples against the training collection (report and
closest pairs in OUT's stem + `_audit/`; see `hdit_train.audit`). The work is in
`hdit_train.sampling`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from models.runtime import setup_logging


def sample(
    ckpt: str,
    out: str = "grid.png",
    prompt: list[str] | None = None,
    class_label: int | None = None,
    n: int = 16,
    steps: int = 50,
    sampler: str = "dpmpp_2m",
    cfg: float = 3.0,
    seed: int = 0,
    size: int | None = None,
    width: int | None = None,
    sigma_max: float = 80.0,
    audit: str | None = None,
) -> Path:
    """Sample n images from the run's EMA weights and save a grid; with `audit`,
    audit them against that collection."""
    # heavy (torch, faiss): after argument parsing, so --help answers at once
    from hdit_train.memorisation import audit as run_audit, tensor_images
    from hdit_train.sampling import sample_images, save_grid

    images = sample_images(
        ckpt, prompt, class_label, n, steps, sampler, cfg, seed, size, width, sigma_max
    )
    path = save_grid(images, out)
    if audit:
        result = run_audit(tensor_images(images), audit, out=f"{Path(out).with_suffix('')}_audit")
        print(
            f"audit: {result.report['n_copies']} of {len(images)} samples copy a training image; "
            f"report {result.report_path}"
        )
    return path


def main(argv: list[str] | None = None) -> None:
    """The command line: parse it, then `sample`."""
    ap = argparse.ArgumentParser(
        prog="python -m hdit_train.sample",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--ckpt", required=True, help="run folder written by hdit_train.train")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--prompt", action="append", help="text prompt (repeat for several; cycled)")
    group.add_argument("--class", dest="class_label", type=int, help="class index")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument(
        "--sampler", default="dpmpp_2m", choices=["euler", "heun", "dpmpp_2m", "dpmpp_2m_sde"]
    )
    ap.add_argument(
        "--cfg", type=float, default=3.0, help="classifier-free guidance scale (1 = off)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=None, help="height (default: training size)")
    ap.add_argument("--width", type=int, default=None, help="width (default: = height)")
    ap.add_argument(
        "--sigma-max", type=float, default=80.0, help="noise level sampling starts from"
    )
    ap.add_argument("--out", default="grid.png")
    ap.add_argument(
        "--audit",
        metavar="COLL",
        default=None,
        help="memorisation audit of the samples against this training collection",
    )
    args = ap.parse_args(argv)
    setup_logging()
    print(
        sample(
            args.ckpt,
            args.out,
            args.prompt,
            args.class_label,
            args.n,
            args.steps,
            args.sampler,
            args.cfg,
            args.seed,
            args.size,
            args.width,
            args.sigma_max,
            args.audit,
        )
    )


if __name__ == "__main__":
    main()
