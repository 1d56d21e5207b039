"""`punsafe`: NudeNet's bundled ONNX detector on pixels, or a LAION-style CLIP-embedding NSFW head.

NudeNet (default) finds body-part boxes; an image's punsafe combines its detections as
`1 - prod(1 - weight[class] * confidence)` with the weights in CLASS_WEIGHTS: exposed
genitalia/anus 1.0, exposed female breast 0.9, exposed buttocks 0.8, covered genitalia 0.3,
covered breast/buttocks 0.15, exposed belly 0.05; faces, feet, armpits, male breast and covered
belly/armpits/feet 0 (present in most safe photos). The model ships inside the nudenet wheel:
nothing is downloaded or written.

With `clip_head_path=` the score comes from CLIP image embeddings instead (LAION's
CLIP-based-NSFW-Detector is a small MLP on them): a torch state_dict (`.pt`/`.pth`) of Linear
layers `{i}.weight (out, in)` / `{i}.bias`, or an `.npz` with either the same keys or Keras-style
`W{i} (in, out)` / `b{i}`. Layers run in order with ReLU between; a 1-unit output is a sigmoid
logit, a 2-unit output a softmax whose index 1 is "unsafe". `score(items, embeddings=E)` then
needs E, the batch's CLIP image embeddings (n, dim) from the same CLIP model the head was
trained on; the images themselves are not read.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Sequence

import nudenet
import numpy as np
import onnxruntime
import torch
from nudenet import NudeDetector
from PIL import Image

from collection.schema import PUNSAFE

log = logging.getLogger(__name__)

CLASS_WEIGHTS: dict[str, float] = {
    "FEMALE_GENITALIA_EXPOSED": 1.0,
    "MALE_GENITALIA_EXPOSED": 1.0,
    "ANUS_EXPOSED": 1.0,
    "FEMALE_BREAST_EXPOSED": 0.9,
    "BUTTOCKS_EXPOSED": 0.8,
    "FEMALE_GENITALIA_COVERED": 0.3,
    "ANUS_COVERED": 0.3,
    "FEMALE_BREAST_COVERED": 0.15,
    "BUTTOCKS_COVERED": 0.15,
    "BELLY_EXPOSED": 0.05,
}


def combine_detections(detections: list[dict[str, Any]]) -> float:
    """punsafe of one image from NudeNet detections ({'class', 'score', ...})."""
    safe = 1.0
    for det in detections:
        safe *= 1.0 - CLASS_WEIGHTS.get(det["class"], 0.0) * float(det["score"])
    return float(np.clip(1.0 - safe, 0.0, 1.0))


def _layers_from_mapping(
    weights: dict[str, np.ndarray], path: Path
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Ordered (W (out, in), b) pairs from torch-style or Keras-style keys."""
    torch_keys = sorted(
        {k.rsplit(".", 1)[0] for k in weights if k.endswith(".weight")},
        key=lambda k: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", k)],
    )
    if torch_keys:
        return [
            (
                np.asarray(weights[f"{k}.weight"], np.float32),
                np.asarray(
                    weights.get(f"{k}.bias", np.zeros(len(weights[f"{k}.weight"]))), np.float32
                ),
            )
            for k in torch_keys
        ]
    keras = sorted((int(k[1:]) for k in weights if re.fullmatch(r"W\d+", k)))
    if keras:
        return [
            (np.asarray(weights[f"W{i}"], np.float32).T, np.asarray(weights[f"b{i}"], np.float32))
            for i in keras
        ]
    raise ValueError(
        f"{path}: no Linear layers found (expected '0.weight'/'0.bias' or 'W0'/'b0' keys, "
        f"got {sorted(weights)[:8]})"
    )


def load_clip_head(path: str | Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Read an MLP head from a torch state_dict or an .npz; checks that layer shapes chain."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"CLIP NSFW head weights not found: {path} (pass the path of a LAION "
            "CLIP-based NSFW head converted to a torch state_dict or .npz)"
        )
    if path.suffix == ".npz":
        with np.load(path) as data:
            weights = {k: data[k] for k in data.files}
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        weights = {k: v.float().numpy() for k, v in state.items()}
    layers = _layers_from_mapping(weights, path)
    for (w0, _), (w1, _) in zip(layers, layers[1:]):
        if w0.shape[0] != w1.shape[1]:
            raise ValueError(f"{path}: layer shapes do not chain: {w0.shape} then {w1.shape}")
    if layers[-1][0].shape[0] not in (1, 2):
        raise ValueError(
            f"{path}: the last layer must have 1 or 2 outputs, has {layers[-1][0].shape[0]}"
        )
    return layers


def _mlp_unsafe(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> np.ndarray:
    for i, (w, b) in enumerate(layers):
        x = x @ w.T + b
        if i < len(layers) - 1:
            x = np.maximum(x, 0.0)
    if x.shape[1] == 1:
        return 1.0 / (1.0 + np.exp(-x[:, 0]))
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e[:, 1] / e.sum(axis=1)


def _to_array(image: Any) -> np.ndarray:
    """PIL image of any mode -> RGBA uint8 array (the layout NudeNet's reader converts from)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    if image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGB")
    return np.ascontiguousarray(np.asarray(image.convert("RGBA")))


class NsfwScorer:
    """punsafe per image: NudeNet by default, a CLIP-embedding head when
    `clip_head_path` is given."""

    column = PUNSAFE
    kind = "image"

    def __init__(
        self,
        clip_head_path: str | Path | None = None,
        batch_size: int = 8,
        threads: int | None = None,
        device: str | None = None,
    ) -> None:
        """threads: ONNX Runtime intra-op threads
        (None: its default, all cores); set 1 per Dask worker."""
        self.batch_size = batch_size
        self.head = load_clip_head(clip_head_path) if clip_head_path else None
        self.needs_embeddings = self.head is not None
        self.detector = None
        if self.head is None:
            self.detector = NudeDetector()
            if threads:
                opts = onnxruntime.SessionOptions()
                opts.intra_op_num_threads = opts.inter_op_num_threads = int(threads)
                model_file = Path(nudenet.__file__).with_name("320n.onnx")  # the wheel's detector
                self.detector.onnx_session = onnxruntime.InferenceSession(
                    str(model_file), opts, providers=["CPUExecutionProvider"]
                )

    def score(self, items: Sequence[Any], embeddings: np.ndarray | None = None) -> np.ndarray:
        """punsafe in [0, 1] per image (NaN for an item that cannot be read)."""
        if self.head is not None:
            if embeddings is None:
                raise ValueError(
                    "this NSFW scorer uses a CLIP head: pass embeddings=<(n, dim) CLIP "
                    "image embeddings> to score()"
                )
            emb = np.asarray(embeddings, np.float32)
            if emb.ndim != 2 or len(emb) != len(items) or emb.shape[1] != self.head[0][0].shape[1]:
                raise ValueError(
                    f"embeddings shape {emb.shape} does not fit {len(items)} items and the "
                    f"head's input dim {self.head[0][0].shape[1]}"
                )
            return _mlp_unsafe(self.head, emb).astype(np.float32)
        out = np.full(len(items), np.nan, np.float32)
        arrays, where = [], []
        for i, item in enumerate(items):
            try:
                arrays.append(_to_array(item))
                where.append(i)
            except (TypeError, ValueError, OSError) as exc:
                log.warning("nsfw: cannot read item %d: %s", i, exc)
        if arrays:
            results = self.detector.detect_batch(arrays, batch_size=self.batch_size)
            for i, dets in zip(where, results):
                out[i] = combine_detections(dets)
        return out
