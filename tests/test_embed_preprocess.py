"""The batched preprocess fast path gives the same tensors as open_clip's per-image preprocess."""

import types

import numpy as np
import pytest
import torch
from PIL import Image

from models.preprocess import Preprocessor, batch_normalizer, fits, resize_crop


def _stack(items, preprocess):
    """The batch `Preprocessor.stack` makes of `model_input` results (was embed_worker._stack)."""
    return Preprocessor(preprocess).stack(items)


@pytest.fixture(scope="module")
def clip(tiny_clip):
    return tiny_clip


@pytest.fixture(scope="module")
def preprocess(clip):
    return clip.preprocess


def _images(size: int, n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)
    ]


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
    assert torch.equal(_stack(items, preprocess), expected)


def test_all_fast_batch_equals_per_image_preprocess(preprocess):
    size, _, _ = batch_normalizer(preprocess)
    imgs = _images(size, 5, 3)
    got = _stack([np.asarray(i) for i in imgs], preprocess)
    assert torch.equal(got, torch.stack([preprocess(i) for i in imgs]))


@pytest.mark.parametrize("chain", ["sieve-tiny", "ViT-B-32"])
def test_resized_images_join_the_batch_with_identical_values(preprocess, chain):
    """Other-sized images, resized and cropped by PIL then normalised in
    the batch, equal the chain."""
    if chain == "ViT-B-32":  # open_clip's own eval transform, no model needed
        import open_clip

        preprocess = open_clip.image_transform(224, is_train=False)
    size, _, _ = batch_normalizer(preprocess)
    imgs = _images(size // 3, 2) + _images(size * 2, 1, 1)
    imgs.append(
        Image.fromarray(
            np.random.default_rng(4).integers(0, 256, (size + 9, size // 2, 3), np.uint8)
        )
    )
    arrays = [np.asarray(resize_crop(preprocess)(i)) for i in imgs]
    assert all(fits(a, size) for a in arrays)
    got = _stack(arrays, preprocess)
    assert torch.equal(got, torch.stack([preprocess(i) for i in imgs]))


def test_resize_crop_only_for_recognised_chains():
    from torchvision import transforms as T

    assert resize_crop(T.Compose([T.Resize(64), T.ToTensor()])) is None


def test_worker_model_input_resizes_into_the_batched_path(clip, preprocess):
    size = clip.prep.batched[0]
    pixels = np.asarray(_images(size + 13, 1, 5)[0])
    got = clip.prep.model_input(pixels)
    assert isinstance(got, np.ndarray) and got.shape == (size, size, 3)
    expected = preprocess(Image.fromarray(pixels))
    assert torch.equal(clip.prep.stack([got])[0], expected)


def test_uint8_batches_normalised_by_the_model_give_the_same_embeddings(clip):
    """The GPU path (uint8 NHWC batch, normalised where the model runs) equals the CPU path."""
    from pipelines import embed_worker

    assert not embed_worker.device_normalises(clip)  # a CPU worker normalises in its reader
    size = clip.prep.batched[0]
    items = [np.asarray(i) for i in _images(size, 4, 6)]
    floats = embed_worker.stack(clip, items)
    assert floats.dtype == torch.float32 and floats.shape == (4, 3, size, size)
    # the same model as a GPU worker holds it
    on_gpu = types.SimpleNamespace(device="cuda:0", prep=clip.prep)
    assert embed_worker.device_normalises(on_gpu)
    raw = embed_worker.stack(on_gpu, items)
    assert raw.dtype == torch.uint8 and raw.shape == (4, size, size, 3)
    with torch.inference_mode():
        assert np.array_equal(clip.encode_image_tensor(raw), clip.encode_image_tensor(floats))
