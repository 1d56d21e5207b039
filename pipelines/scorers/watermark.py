"""`pwatermark`: the bundled CNN (`models.watermark_cnn`, trained here on generated overlays;
the offline default) or LAION's efficientnet_b3a watermark model from a user-supplied checkpoint.

The bundled model is trained on first use, once, into the cache (see `models.cache`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from collection.schema import PWATERMARK
from models import watermark_cnn

log = logging.getLogger(__name__)
LAION_INPUT_SIZE = 256  # LAION-5B-WatermarkDetection: Resize((256, 256)), ImageNet normalisation
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _pil_batch(items: Sequence[Any], size: int) -> tuple[Any, list[int]]:
    """Resize readable PIL images to size x size RGB floats in [0, 1];
    return (tensor, their indices)."""
    arrays, where = [], []
    for i, item in enumerate(items):
        try:
            if not isinstance(item, Image.Image):
                raise TypeError(f"expected a PIL image, got {type(item).__name__}")
            img = item.convert("RGB").resize((size, size), Image.BILINEAR)
            arrays.append(np.asarray(img, np.float32) / 255.0)
            where.append(i)
        except (TypeError, ValueError, OSError) as exc:
            log.warning("watermark: cannot read item %d: %s", i, exc)
    if not arrays:
        return torch.zeros(0, 3, size, size), where
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous(), where


def load_laion(checkpoint: str | Path) -> Any:
    """LAION's watermark model: timm efficientnet_b3a with its 1536-625-256-2 classifier head."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"LAION watermark checkpoint not found: {checkpoint} (download "
            "watermark_model_v1.pt from LAION-AI/LAION-5B-WatermarkDetection and pass its path)"
        )
    try:
        import timm  # optional, and seconds to import: only LAION's checkpoint needs it
    except ImportError as exc:
        raise ImportError("LAION's watermark checkpoint needs timm: pip install timm") from exc
    model = timm.create_model("efficientnet_b3a", pretrained=False, num_classes=2)
    model.classifier = nn.Sequential(
        nn.Linear(1536, 625),
        nn.ReLU(),
        nn.Dropout(p=0.3),
        nn.Linear(625, 256),
        nn.ReLU(),
        nn.Linear(256, 2),
    )
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return model.eval()


class WatermarkScorer:
    """pwatermark per image. Options: model_path (bundled CNN file),
    laion_checkpoint, batch_size, device."""

    column = PWATERMARK
    kind = "image"
    needs_embeddings = False

    def __init__(
        self,
        model_path: str | Path | None = None,
        laion_checkpoint: str | Path | None = None,
        batch_size: int = 64,
        device: str | None = None,
    ) -> None:
        self.device = torch.device(device or "cpu")
        self.batch_size = batch_size
        self.laion = laion_checkpoint is not None
        if self.laion:
            self.model = load_laion(laion_checkpoint)
            self.size = LAION_INPUT_SIZE
        else:
            self.model, self.size = watermark_cnn.load(model_path or watermark_cnn.model_path())
        self.model = self.model.to(self.device).eval()

    def _probs(self, x: Any) -> Any:
        if self.laion:  # LAION's example: softmax over 2 classes, index 0 = watermark
            mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
            return torch.softmax(self.model((x - mean) / std), dim=1)[:, 0]
        return torch.sigmoid(self.model(x))

    def score(self, items: Sequence[Any], embeddings: np.ndarray | None = None) -> np.ndarray:
        """pwatermark in [0, 1] per image (NaN for an item that cannot be read)."""
        out = np.full(len(items), np.nan, np.float32)
        for start in range(0, len(items), self.batch_size):
            x, where = _pil_batch(items[start : start + self.batch_size], self.size)
            if not where:
                continue
            with torch.inference_mode():
                probs = self._probs(x.to(self.device)).float().cpu().numpy()
            out[[start + i for i in where]] = probs
        return out
