"""`pwatermark`: a small CNN the project trains itself on generated overlays (offline default),
or LAION's efficientnet_b3a watermark model from a user-supplied checkpoint.

The bundled model lives in `cache_dir()/watermark/watermark_cnn.pt`; when it is missing,
the first `load_scorer("watermark")` trains it (`pipelines.train_watermark`, a few minutes on
two CPU cores) under a file lock, so parallel workers train it once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from curation.schema import PWATERMARK

log = logging.getLogger(__name__)
MODEL_FILE = "watermark_cnn.pt"
INPUT_SIZE = 64
LAION_INPUT_SIZE = 256  # LAION-5B-WatermarkDetection: Resize((256, 256)), ImageNet normalisation
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def build_cnn(width: int = 32) -> Any:
    """The bundled detector: five 3x3 conv blocks (three stride-2), global avg+max pool, one logit."""
    from torch import nn

    chans = [3, width // 2, width, width, 2 * width, 2 * width]
    strides = [2, 1, 2, 1, 2]
    layers: list[nn.Module] = []
    for cin, cout, stride in zip(chans, chans[1:], strides):
        layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                   nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    class WatermarkCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(*layers)
            self.head = nn.Linear(2 * chans[-1], 1)

        def forward(self, x: Any) -> Any:  # x: (n, 3, H, W) in [0, 1]
            import torch

            f = self.features((x - 0.5) / 0.25)
            pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
            return self.head(pooled).squeeze(1)

    return WatermarkCNN()


def default_model_path() -> Path:
    from pipelines.cache import cache_dir

    return cache_dir() / "watermark" / MODEL_FILE


def ensure_model(path: Path | None = None, steps: int | None = None) -> Path:
    """The bundled model's path, training it first if missing (one trainer at a time, file lock)."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"watermark model not found: {path} (train one with "
                                    "`python -m pipelines.train_watermark --out DIR`, or omit model_path "
                                    "to use the cached default)")
        return path
    from pipelines.cache import build_once

    path = default_model_path()

    def build() -> None:
        from pipelines.train_watermark import DEFAULT_STEPS, train

        log.warning("watermark model missing at %s: training it now (once; a few minutes on CPU)", path)
        train(out=path.parent, steps=steps or DEFAULT_STEPS)

    build_once(path.exists, build, path.parent / ".train.lock")
    return path


def _pil_batch(items: Sequence[Any], size: int) -> tuple[Any, list[int]]:
    """Resize readable PIL images to size x size RGB floats in [0, 1]; return (tensor, their indices)."""
    import torch
    from PIL import Image

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
        raise FileNotFoundError(f"LAION watermark checkpoint not found: {checkpoint} (download "
                                "watermark_model_v1.pt from LAION-AI/LAION-5B-WatermarkDetection and pass its path)")
    import timm
    import torch
    from torch import nn

    model = timm.create_model("efficientnet_b3a", pretrained=False, num_classes=2)
    model.classifier = nn.Sequential(nn.Linear(1536, 625), nn.ReLU(), nn.Dropout(p=0.3),
                                     nn.Linear(625, 256), nn.ReLU(), nn.Linear(256, 2))
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return model.eval()


class WatermarkScorer:
    """pwatermark per image. Options: model_path (bundled CNN file), laion_checkpoint, batch_size, device."""

    column = PWATERMARK
    kind = "image"
    needs_embeddings = False

    def __init__(self, model_path: str | Path | None = None, laion_checkpoint: str | Path | None = None,
                 batch_size: int = 64, device: str | None = None) -> None:
        import torch

        self.device = torch.device(device or "cpu")
        self.batch_size = batch_size
        self.laion = laion_checkpoint is not None
        if self.laion:
            self.model = load_laion(laion_checkpoint)
            self.size = LAION_INPUT_SIZE
        else:
            path = ensure_model(Path(model_path) if model_path else None)
            blob = torch.load(path, map_location="cpu", weights_only=True)
            self.meta = blob.get("meta", {})
            self.model = build_cnn(int(self.meta.get("width", 32)))
            self.model.load_state_dict(blob["state_dict"])
            self.size = int(self.meta.get("input_size", INPUT_SIZE))
        self.model = self.model.to(self.device).eval()

    def _probs(self, x: Any) -> Any:
        import torch

        if self.laion:  # LAION's example: softmax over 2 classes, index 0 = watermark
            mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
            return torch.softmax(self.model((x - mean) / std), dim=1)[:, 0]
        return torch.sigmoid(self.model(x))

    def score(self, items: Sequence[Any], embeddings: np.ndarray | None = None) -> np.ndarray:
        """pwatermark in [0, 1] per image (NaN for an item that cannot be read)."""
        import torch

        out = np.full(len(items), np.nan, np.float32)
        for start in range(0, len(items), self.batch_size):
            x, where = _pil_batch(items[start:start + self.batch_size], self.size)
            if not where:
                continue
            with torch.inference_mode():
                probs = self._probs(x.to(self.device)).float().cpu().numpy()
            out[[start + i for i in where]] = probs
        return out
