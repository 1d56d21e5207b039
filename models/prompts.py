"""Weighted prompts, one syntax everywhere: `"a red star:1|blurry:-0.5"`.

VQGAN-CLIP's convention: prompts separated by `|`, each `text[:weight[:stop]]`; weight
defaults to 1 (negative pushes away), stop to -inf (guidance stops pulling once the loss falls
below it). Search, subset kNN clauses and CLIP guidance all parse with `parse_prompts`, so a
prompt string means the same thing wherever it is typed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

#: a field that is meant as a number: no spaces inside (so "photo: a dog" keeps its colon as text)
_NUMBERISH = re.compile(r"^\s*\S+\s*$")


class PromptError(ValueError):
    """A prompt string that cannot be parsed; the message names the part and what is wrong."""


@dataclass(frozen=True)
class WeightedPrompt:
    text: str
    weight: float = 1.0
    stop: float = -math.inf

    def __str__(self) -> str:
        out = (
            self.text
            if self.weight == 1 and self.stop == -math.inf
            else f"{self.text}:{self.weight:g}"
        )
        return out if self.stop == -math.inf else f"{out}:{self.stop:g}"


def _number(field: str, what: str, part: str) -> float:
    try:
        value = float(field)
    except ValueError:
        raise PromptError(f"prompt {part!r}: {what} {field.strip()!r} is not a number") from None
    if math.isnan(value) or (what == "weight" and math.isinf(value)):
        raise PromptError(f"prompt {part!r}: {what} {field.strip()!r} must be a finite number")
    return value


def parse_prompt(part: str) -> WeightedPrompt:
    """One `text[:weight[:stop]]`; trailing fields that contain spaces belong to the text."""
    fields = part.rsplit(":", 2)
    numeric = 0
    for field in reversed(fields[1:]):
        if not _NUMBERISH.match(field):
            break
        numeric += 1
    if len(fields) == 3 and numeric == 1:  # "text:with colon:1" - the middle field is text
        fields = [":".join(fields[:2]), fields[2]]
    else:
        fields = [":".join(fields[: len(fields) - numeric])] + fields[len(fields) - numeric :]
    text = fields[0].strip()
    if not text:
        raise PromptError(f"prompt {part!r}: empty text")
    weight = _number(fields[1], "weight", part) if len(fields) > 1 else 1.0
    stop = _number(fields[2], "stop", part) if len(fields) > 2 else -math.inf
    return WeightedPrompt(text, weight, stop)


def parse_prompts(spec: str | Sequence[str], require_positive: bool = True) -> list[WeightedPrompt]:
    """`"a:1|b:-0.5"` (or a list of such strings) -> prompts; PromptError names a malformed part.

    At least one prompt must have a positive weight: a query made only of what to avoid has
    no direction to go. A caller that mixes these prompts with other weighted parts (a subset
    kNN clause's images, keys and embeddings; guidance's image prompts) passes
    `require_positive=False` and checks the whole mix itself.
    """
    parts = spec.split("|") if isinstance(spec, str) else [p for s in spec for p in s.split("|")]
    if not parts or not any(p.strip() for p in parts):
        raise PromptError(
            "empty prompt: give text such as 'a red star' or 'a red star:1|blurry:-0.5'"
        )
    prompts = [parse_prompt(p) for p in parts]
    if require_positive and not any(p.weight > 0 for p in prompts):
        raise PromptError(f"prompts {spec!r}: at least one needs a positive weight")
    return prompts


def combine(vectors: np.ndarray, prompts: Sequence[WeightedPrompt]) -> np.ndarray:
    """The weighted sum of L2-normalised prompt embeddings (one row per prompt), renormalised:
    the single query vector a weighted prompt stands for in search."""
    weights = np.asarray([p.weight for p in prompts], np.float32)[:, None]
    v = (np.asarray(vectors, np.float32) * weights).sum(0)
    norm = float(np.linalg.norm(v))
    if not np.isfinite(norm) or norm == 0:
        raise PromptError("the weighted prompts cancel out: their combined embedding is zero")
    return v / norm
