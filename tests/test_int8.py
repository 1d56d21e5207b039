"""--precision int8: the rebuilt attention is the same function,
quantized towers stay close to fp32."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch

from models.int8 import SelfAttention, int8_supported, quantize_int8, split_self_attention
from models.speed import model_dtype
from tests.tiny_models import as_clip, random_vit_clip

needs_int8 = pytest.mark.skipif(
    not int8_supported("cpu"), reason="torch has no x86/fbgemm int8 engine"
)


@pytest.fixture(scope="module")
def vit():
    return random_vit_clip(width=128, image_size=64, patch_size=16, embed_dim=64, captions=4)


def _cos(a, b):
    a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
    return torch.nn.functional.cosine_similarity(a.float(), b.float()).min().item()


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", [None, "float", "bool"])
def test_rebuilt_self_attention_equals_multihead_attention(batch_first, mask):
    from torch import nn

    torch.manual_seed(1)
    mha = nn.MultiheadAttention(64, 4, batch_first=batch_first).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    x = torch.randn(3, 7, 64) if batch_first else torch.randn(7, 3, 64)
    causal = torch.ones(7, 7, dtype=torch.bool).triu(1)  # True: may not attend
    attn_mask = {
        None: None,
        "bool": causal,
        "float": torch.zeros(7, 7).masked_fill(causal, float("-inf")),
    }[mask]
    rebuilt = SelfAttention(mha)
    with torch.inference_mode():
        want = mha(x, x, x, need_weights=False, attn_mask=attn_mask)[0]
        got, weights = rebuilt(x, x, x, need_weights=False, attn_mask=attn_mask)
    assert weights is None
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="one input"):
        rebuilt(x, torch.zeros_like(x), x)


def test_splitting_attention_keeps_the_model_exact(vit):
    model, tokens = vit
    images = torch.randn(2, 3, 64, 64)
    split = copy.deepcopy(model)
    assert split_self_attention(split) == 4
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in split.modules())
    with torch.inference_mode():
        torch.testing.assert_close(
            split.encode_image(images), model.encode_image(images), atol=1e-5, rtol=1e-4
        )
        torch.testing.assert_close(
            split.encode_text(tokens), model.encode_text(tokens), atol=1e-5, rtol=1e-4
        )


@needs_int8
def test_int8_quantizes_every_block_linear_and_stays_close_to_fp32(vit):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    model, tokens = vit
    images = torch.randn(4, 3, 64, 64)
    ref = as_clip(copy.deepcopy(model), trim_text=False)
    ref_img, ref_txt = ref.encode_image_tensor(images), ref.encode_text_tokens(tokens)
    fast = as_clip(copy.deepcopy(model), precision="int8")
    quantized = [m for m in fast.model.modules() if isinstance(m, DynamicLinear)]
    assert len(quantized) == 4 * 4  # in_proj, out_proj, c_fc, c_proj in each of 2 + 2 blocks
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in fast.model.modules())
    assert fast.trim_text
    img, txt = fast.encode_image_tensor(images), fast.encode_text_tokens(tokens)
    # numpy now (FastClip gave tensors)
    assert img.dtype == np.float32 and img.shape == ref_img.shape
    torch.testing.assert_close(torch.from_numpy(img).norm(dim=-1), torch.ones(4))
    assert _cos(img, ref_img) > 0.99 and _cos(txt, ref_txt) > 0.99
    assert _cos(img, ref_img) < 1.0 - 1e-7  # quantized, not a no-op
    with (
        torch.inference_mode()
    ):  # the full context too (trimming changes the activation scales a little)
        assert _cos(fast.model.encode_text(tokens), ref_txt) > 0.99


@needs_int8
def test_int8_resnet_tower_stays_fp32_and_says_so(tiny_clip, caplog):
    """sieve-tiny's image tower is a ResNet: only its text blocks are quantized."""
    from models.clip import load_clip
    from models.scenes import iter_samples

    samples = list(iter_samples(16, seed=99))
    with caplog.at_level(logging.WARNING, logger="models.int8"):
        q = load_clip("sieve-tiny", precision="int8")
    assert q.device == "cpu" and "image tower has no transformer blocks" in caplog.text
    images, captions = [s.image for s in samples], [s.caption for s in samples]
    assert (q.encode_images(images) == tiny_clip.encode_images(images)).all()
    a, b = q.encode_texts(captions), tiny_clip.encode_texts(captions)
    assert (a * b).sum(1).min() > 0.999 and not (a == b).all()


def test_int8_refuses_a_gpu_and_compile(vit):
    from models.clip import load_clip
    from pipelines.embed import embed

    for call in (
        lambda: model_dtype("int8", "cuda"),
        lambda: load_clip("sieve-tiny", device="cuda", precision="int8"),
        lambda: embed("nowhere", "nowhere-out", precision="int8", device="cuda:0"),
    ):
        with pytest.raises(ValueError, match="CPU only"):
            call()
    with pytest.raises(ValueError, match="compile"):
        as_clip(copy.deepcopy(vit[0]), precision="int8", compile=True)
    assert model_dtype("int8", "cpu") == torch.float32


@needs_int8
def test_quantize_int8_reports_a_torch_without_the_engine(vit, monkeypatch):
    from models import int8

    monkeypatch.setattr(int8, "int8_supported", lambda device="cpu": False)
    with pytest.raises(ValueError, match="fp32"):
        quantize_int8(copy.deepcopy(vit[0]))
