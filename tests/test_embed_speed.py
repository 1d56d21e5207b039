"""Speed settings keep the embeddings: trimmed text is exact, bf16 and channels_last stay close."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from models.speed import bf16_supported, can_trim_text, encode_text_trimmed
from tests.tiny_models import as_clip, random_vit_clip


@pytest.fixture(scope="module")
def tiny():
    return random_vit_clip(width=64, image_size=32, patch_size=8, embed_dim=32)


def _cos(a, b):
    a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
    return torch.nn.functional.cosine_similarity(a.float(), b.float()).min().item()


def test_trimmed_text_tower_equals_full_context(tiny):
    model, tokens = tiny
    assert can_trim_text(model)
    with torch.inference_mode():
        full = model.encode_text(tokens)
        trimmed = encode_text_trimmed(model, tokens)
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=1e-4)


def test_clip_settings_stay_close_to_fp32(tiny):
    model, tokens = tiny
    images = torch.randn(4, 3, 32, 32)
    ref = as_clip(model, trim_text=False)
    ref_img, ref_txt = ref.encode_image_tensor(images), ref.encode_text_tokens(tokens)
    assert ref_img.dtype == np.float32  # Clip returns numpy float32 (FastClip returned tensors)
    torch.testing.assert_close(torch.from_numpy(ref_img).norm(dim=-1), torch.ones(4))
    settings = [{"channels_last": True}, {"trim_text": True}]
    if bf16_supported():
        settings.append({"precision": "bf16"})
    for opts in settings:
        fast = as_clip(copy.deepcopy(model), **opts)
        assert _cos(fast.encode_image_tensor(images), ref_img) > 0.995, opts
        assert _cos(fast.encode_text_tokens(tokens), ref_txt) > 0.995, opts


@pytest.mark.parametrize("amx, warns", [(False, True), (True, False), (None, False)])
def test_bf16_on_a_cpu_without_amx_warns_that_fp32_is_likely_faster(
    monkeypatch, caplog, amx, warns
):
    from models import speed

    monkeypatch.setattr(speed, "bf16_supported", lambda device="cpu": True)
    monkeypatch.setattr(speed, "cpu_has_amx", lambda: amx)
    with caplog.at_level("WARNING", logger="models.speed"):
        assert speed.model_dtype("bf16", "cpu") == torch.bfloat16
    assert ("without AMX" in caplog.text) == warns


def test_compiled_image_tower_pads_short_batches_to_one_graph(tiny):
    """compile: same embeddings as eager; a short batch reuses the first batch's graph."""
    from torch._dynamo.utils import counters

    model, _ = tiny
    images = torch.randn(6, 3, 32, 32)
    ref = as_clip(copy.deepcopy(model), trim_text=False).encode_image_tensor(images)
    fast = as_clip(copy.deepcopy(model), compile=True)
    torch._dynamo.reset()
    counters.clear()
    full = fast.encode_image_tensor(images[:4])
    short = fast.encode_image_tensor(images[4:])
    assert fast.pad_to == 4 and short.shape == (2, ref.shape[1])
    assert counters["stats"]["unique_graphs"] == 1  # the 2-image batch ran the 4-image graph
    assert _cos(np.concatenate([full, short]), ref) > 0.9999
