"""CLIP specs and speed-setting names: what a command checks before it loads anything.

Specs follow clip-retrieval's naming:
  open_clip:ARCH/PRETRAINED_TAG   real open_clip weights (needs a model hub; fails clearly offline)
  open_clip:ARCH/path/to/ckpt.pt  open_clip architecture + a local checkpoint file
  open_clip:ARCH                  random init (speed benchmarks only)
  local-dir:/path                 folder with open_clip_config.json + weights (open_clip's own
                                  format)
  sieve-tiny                      the project's offline CLIP, trained on first use into the cache
This module imports nothing heavy, so a command can refuse a malformed spec or precision at
once; `models.clip.load_clip` does the loading.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

TINY_NAME = "sieve-tiny"
#: `--precision` choices of every command that embeds (pipelines.embed, indices.serve)
PRECISIONS = ("fp32", "bf16", "int8")
#: speed settings a Clip takes besides precision (see models.speed)
SPEED_OPTIONS = ("channels_last", "compile", "trim_text")
ACCEPTED = (
    "'open_clip:ARCH/PRETRAINED_TAG' (e.g. open_clip:ViT-B-32/laion2b_s34b_b79k), "
    "'open_clip:ARCH/path/to/checkpoint.pt', 'open_clip:ARCH' (random init), "
    "'local-dir:/path/to/folder' (open_clip_config.json + weights), 'sieve-tiny'"
)
_WEIGHT_FILES = (".pt", ".pth", ".bin", ".safetensors")


@dataclass(frozen=True)
class ClipSpec:
    """A parsed spec: `kind` is 'tiny', 'open_clip' or 'local-dir'."""

    text: str
    kind: str
    arch: str = ""
    #: a pretrained tag, a checkpoint path, or '' for random weights
    #: (open_clip); the folder (local-dir)
    weights: str = ""

    @property
    def checkpoint(self) -> bool:
        """Whether `weights` names a local checkpoint file rather than a pretrained tag."""
        w = self.weights
        return bool(w) and (
            "/" in w or os.path.splitext(w)[1] in _WEIGHT_FILES or os.path.exists(w)
        )


def bad_spec(spec: str, why: str) -> ValueError:
    return ValueError(f"bad CLIP spec {spec!r}: {why}. Accepted forms: {ACCEPTED}")


def parse_spec(spec: str) -> ClipSpec:
    """Split a spec into its parts; ValueError
    (naming the spec and the accepted forms) if malformed."""
    if not isinstance(spec, str) or not spec.strip():
        raise bad_spec(str(spec), "empty spec")
    spec = spec.strip()
    if spec == TINY_NAME:
        return ClipSpec(spec, "tiny")
    if spec.startswith("open_clip:"):
        arch, _, weights = spec[len("open_clip:") :].partition("/")
        if not arch:
            raise bad_spec(spec, "no architecture after 'open_clip:'")
        return ClipSpec(spec, "open_clip", arch, weights)
    if spec.startswith("local-dir:"):
        folder = spec[len("local-dir:") :]
        if not folder:
            raise bad_spec(spec, "no folder after 'local-dir:'")
        return ClipSpec(spec, "local-dir", weights=folder)
    raise bad_spec(spec, "unknown scheme")


def check_precision(precision: str) -> str:
    """`precision` if it is one of PRECISIONS, else a ValueError naming the choices."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} not supported; use one of {PRECISIONS}")
    return precision


def int8_device(device: str | None = None) -> str:
    """The device int8 runs on: quantized kernels are CPU ones, so the CPU when none is given;
    any other device is refused."""
    device = str(device or "cpu")
    if not device.startswith("cpu"):
        raise ValueError(f"precision int8 runs on the CPU only, not {device}; use bf16 on a GPU")
    return device
