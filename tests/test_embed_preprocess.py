"""The batched preprocess fast path gives the same tensors as open_clip's per-image preprocess."""

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.decode import batch_normalizer, fits
from pipelines.embed_worker import _stack


@pytest.fixture(scope="module")
def preprocess():
    from pipelines.encoders import load_clip

    return load_clip("sieve-tiny").preprocess


def _images(size: int, n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_open_clip_chain_is_recognised(preprocess):
    size, mean, std = batch_normalizer(preprocess)
    assert size == preprocess.transforms[0].size or [size] == list(preprocess.transforms[0].size)
    assert len(mean) == len(std) == 3


def test_other_chains_are_not_batched():
    from torchvision import transforms as T

    assert batch_normalizer(T.Compose([T.Resize(64), T.ToTensor()])) is None
    assert batch_normalizer(lambda img: img) is None


def test_mixed_batch_equals_per_image_preprocess(preprocess):
    size, _, _ = batch_normalizer(preprocess)
    # model-sized, larger, smaller, non-square and greyscale images, interleaved
    imgs = _images(size, 3) + _images(size * 2, 1, 1) + _images(size // 2, 1, 2)
    imgs.append(Image.fromarray(np.zeros((size, size + 7, 3), np.uint8)))
    imgs.insert(2, imgs[0].convert("L"))
    items = [np.asarray(i) if fits(i, size) else preprocess(i) for i in imgs]
    assert sum(isinstance(x, np.ndarray) for x in items) == 3
    expected = torch.stack([preprocess(i) for i in imgs])
    assert torch.equal(_stack(items, batch_normalizer(preprocess)), expected)


def test_all_fast_batch_equals_per_image_preprocess(preprocess):
    size, _, _ = batch_normalizer(preprocess)
    imgs = _images(size, 5, 3)
    got = _stack([np.asarray(i) for i in imgs], batch_normalizer(preprocess))
    assert torch.equal(got, torch.stack([preprocess(i) for i in imgs]))
