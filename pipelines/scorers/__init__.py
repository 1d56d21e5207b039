"""Per-sample quality scores for the embed job: NSFW (`punsafe`), watermark (`pwatermark`) and
caption toxicity (`ptoxic`), behind one interface so the pipeline treats them alike.

`load_scorer(name, **opts)` builds a scorer once (model loaded at construction); its
`score(items, embeddings=None)` takes a batch — PIL images for `kind == "image"`, caption
strings for `kind == "text"` — and returns float32 probabilities in [0, 1], one per item.
An item that cannot be scored (an undecodable image, a non-string caption) gets NaN and a
logged warning rather than failing the batch. `embeddings` (the batch's CLIP image
embeddings, (n, dim)) is needed only by the NSFW scorer when it uses a LAION CLIP head;
`scorer.needs_embeddings` says so.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np

SCORER_NAMES: tuple[str, ...] = ("nsfw", "watermark", "toxicity")


class Scorer(Protocol):
    """What every scorer offers the pipeline."""

    column: str  # the metadata column it fills (collection.schema constant)
    kind: str  # "image" or "text"
    needs_embeddings: bool  # score() must be given the batch's CLIP image embeddings

    def score(self, items: Sequence[Any], embeddings: np.ndarray | None = None) -> np.ndarray: ...


def load_scorer(name: str, **opts: Any) -> Scorer:
    """Build the scorer called `name` (one of SCORER_NAMES) with its
    options; loads its model once."""
    # each scorer's module is imported only when asked for: each pulls a heavy
    # runtime (onnxruntime, torch)
    if name == "nsfw":
        from pipelines.scorers.nsfw import NsfwScorer  # onnxruntime, nudenet

        return NsfwScorer(**opts)
    if name == "watermark":
        from pipelines.scorers.watermark import WatermarkScorer  # torch

        return WatermarkScorer(**opts)
    if name == "toxicity":
        from pipelines.scorers.toxicity import (
            ToxicityScorer,
        )  # light, but imported like its siblings

        return ToxicityScorer(**opts)
    raise ValueError(f"unknown scorer {name!r}; valid names: {', '.join(SCORER_NAMES)}")


__all__ = ["SCORER_NAMES", "Scorer", "load_scorer"]
