"""HDiT: model shapes, neighborhood attention vs brute force, training, checkpoints, sampling."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from hdit_train.diffusion import Denoiser, guided, karras_sigmas, rand_cosine_interpolated, sample
from hdit_train.model import HDiT, HDiTConfig, LevelSpec, MappingSpec
from hdit_train.neighborhood import brute_force_na2d, na2d, na2d_torch, neighborhood_mask

TINY_MODEL = {
    "patch_size": 2,
    "levels": [
        {
            "depth": 1,
            "width": 32,
            "d_ff": 64,
            "attn": "neighborhood",
            "d_head": 16,
            "kernel_size": 3,
        },
        {"depth": 1, "width": 64, "d_ff": 128, "attn": "global", "d_head": 16},
    ],
    "mapping": {"depth": 1, "width": 32, "d_ff": 64},
}


def tiny(**kw) -> HDiT:
    return HDiT(HDiTConfig.from_dict({**TINY_MODEL, **kw}))


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Give zero-initialised layers weights so conditioning actually changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("h,w", [(16, 16), (32, 32), (16, 48), (40, 24)])
def test_shapes_across_resolutions_and_aspect_ratios(h, w):
    model = tiny(num_classes=5, mapping_cond_dim=8)
    randomize(model)
    x = torch.randn(2, 3, h, w)
    out = model(x, torch.randn(2), torch.tensor([1, 5]), torch.randn(2, 8))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_flowers_shape_parameter_count():
    levels = [
        LevelSpec(2, 128, 384),
        LevelSpec(2, 256, 768),
        LevelSpec(4, 512, 1536, attn="global"),
    ]
    model = HDiT(HDiTConfig(levels=levels, mapping=MappingSpec(2, 256, 768), patch_size=4))
    assert 22.0e6 < sum(p.numel() for p in model.parameters()) < 22.6e6
    assert model(torch.randn(1, 3, 64, 64), torch.zeros(1)).shape == (1, 3, 64, 64)


def test_size_not_multiple_of_patch_is_rejected():
    with pytest.raises(ValueError, match="multiple of 4"):
        tiny()(torch.randn(1, 3, 18, 16), torch.zeros(1))


def test_untrained_network_outputs_zero():
    """Zero-initialised output projections: F(x) = 0 at init."""
    out = tiny()(torch.randn(2, 3, 16, 16), torch.randn(2))
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize(
    "h,w,k,tile",
    [
        (16, 16, 7, None),
        (16, 16, 7, 4),
        (20, 13, 5, 4),
        (24, 24, 7, 8),
        (9, 9, 3, None),
        (30, 17, 7, 6),
        (7, 7, 7, None),
        (24, 16, 7, 8),
        (32, 40, 5, 8),
    ],
)
def test_neighborhood_attention_matches_brute_force(h, w, k, tile):
    g = torch.Generator().manual_seed(h * w + k)
    q, key, v = (torch.randn(2, 3, h, w, 8, generator=g, requires_grad=True) for _ in range(3))
    ours = na2d_torch(q, key, v, k, scale=0.7, tile=tile)
    ref = brute_force_na2d(q, key, v, k, scale=0.7)
    assert (ours - ref).abs().max() < 1e-5
    grad_out = torch.randn(ours.shape, generator=g)
    g_ours = torch.autograd.grad(ours, (q, key, v), grad_out)
    g_ref = torch.autograd.grad(ref, (q, key, v), grad_out)
    for a, b in zip(g_ours, g_ref):
        assert (a - b).abs().max() < 1e-5


def test_window_semantics_every_query_sees_kernel_squared_keys():
    mask = neighborhood_mask(10, 12, 5)
    assert (mask.sum(1) == 25).all()
    # corner query (0, 0) sees rows 0-4, cols 0-4: the window is shifted inwards, not cropped
    corner = mask[0].view(10, 12)
    assert corner[:5, :5].all() and corner.sum() == 25
    # a centre query's window is centred on it
    centre = mask[5 * 12 + 6].view(10, 12)
    assert centre[3:8, 4:9].all()


def test_na2d_dispatch_uses_torch_path_on_cpu():
    q = torch.randn(1, 2, 12, 12, 8)
    assert torch.allclose(na2d(q, q, q, 5), brute_force_na2d(q, q, q, 5), atol=1e-5)


def test_overfitting_one_batch_drives_loss_down():
    torch.manual_seed(0)
    denoiser = Denoiser(tiny())
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    noise = torch.randn_like(x)
    sigma = torch.tensor([0.3, 0.6, 1.0, 2.0])
    opt = torch.optim.AdamW(denoiser.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = denoiser.loss(x, noise, sigma).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_sigma_sampling_and_schedule_ranges():
    s = rand_cosine_interpolated(4000, 64, generator=torch.Generator().manual_seed(0))
    assert s.min() >= 1e-3 * 0.999 and s.max() <= 1e3 * 1.001
    assert 0.05 < s.median() < 5  # mass around σ_data, not at the extremes
    k = karras_sigmas(10, 0.01, 80)
    assert len(k) == 11 and k[-1] == 0 and abs(k[0] - 80) < 1e-3 and abs(k[-2] - 0.01) < 1e-6
    assert (k[:-1].diff() < 0).all()


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m", "dpmpp_2m_sde"])
def test_sampler_is_deterministic_for_a_seed(sampler):
    from hdit_train.sampling import generate

    den = Denoiser(tiny()).eval()
    randomize(den)
    cfg = {"cond": {"kind": "none"}}
    a = generate(den, cfg, 2, 16, {}, {}, steps=4, sampler=sampler, seed=1)
    b = generate(den, cfg, 2, 16, {}, {}, steps=4, sampler=sampler, seed=1)
    c = generate(den, cfg, 2, 16, {}, {}, steps=4, sampler=sampler, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.isfinite(a).all()


def test_samplers_recover_a_point_mass():
    """With the exact denoiser of a one-image dataset every sampler must land on that image."""
    target = torch.full((1, 3, 4, 4), 0.25)
    exact = lambda x, s: target.expand_as(x)  # noqa: E731
    sigmas = karras_sigmas(8, 0.01, 80)
    for name in ("euler", "heun", "dpmpp_2m", "dpmpp_2m_sde"):
        x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 80
        out = sample(exact, x, sigmas, name, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(out, target.expand_as(out), atol=1e-4), name


@pytest.mark.parametrize("kind", ["class", "clip"])
def test_cfg_scale_one_equals_conditional(kind):
    den = Denoiser(tiny(num_classes=4, mapping_cond_dim=6)).eval()
    randomize(den)
    x, sigma = torch.randn(3, 3, 16, 16), torch.tensor([0.5, 1.0, 3.0])
    if kind == "class":
        cond, uncond = (
            {"class_labels": torch.tensor([0, 1, 2])},
            {"class_labels": torch.full((3,), 4)},
        )
    else:
        emb = torch.nn.functional.normalize(torch.randn(3, 6), dim=-1)
        cond, uncond = {"mapping_cond": emb}, {"mapping_cond": torch.zeros(3, 6)}
    with torch.no_grad():
        direct = den(x, sigma, **cond)
        one = guided(den, 1.0, cond, uncond)(x, sigma)
        three = guided(den, 3.0, cond, uncond)(x, sigma)
    assert torch.allclose(one, direct, atol=1e-5)
    assert not torch.allclose(three, direct, atol=1e-3)


# ---------------------------------------------------------------- training on shards


def _config(tmp_path: Path, **train) -> Path:
    cfg = {
        "model": TINY_MODEL,
        "cond": {
            "kind": "class",
            "class_field": "shape",
            "classes": ["circle", "square", "triangle", "star", "hexagon", "diamond", "cross"],
        },
        "data": {"size": 16, "shuffle_buffer": 8},
        "train": {
            "batch_size": 4,
            "max_steps": 4,
            "warmup_steps": 2,
            "log_every": 1,
            "ckpt_every": 0,
            "sample_every": 0,
            "compile": False,
            **train,
        },
        "sample": {"n": 4, "steps": 2},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from pipelines.generate import write_sample_dataset

    out = tmp_path_factory.mktemp("shards")
    write_sample_dataset(
        out, 24, size=32, seed=0, watermark_fraction=0.0, corrupt_fraction=0.1, shard_size=12
    )
    return out


def test_resume_gives_identical_next_steps(shards, tmp_path):
    from safetensors.torch import load_file

    from hdit_train.train import train

    cfg = _config(tmp_path)
    straight = train(str(shards), str(cfg), str(tmp_path / "a"), max_steps=4)
    train(str(shards), str(cfg), str(tmp_path / "b"), max_steps=2)
    resumed = train(str(shards), str(cfg), str(tmp_path / "b"), resume=True, max_steps=4)
    a = load_file(str(straight / "checkpoint.safetensors"))
    b = load_file(str(resumed / "checkpoint.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        if k.startswith(("model.", "ema.", "opt.")):
            assert torch.equal(a[k], b[k]), k
    state = json.loads((resumed / "state.json").read_text())
    assert state["step"] == 4 and state["data_hash"]
    assert (resumed / "samples" / "step_000004.png").exists()
    assert len((straight / "loss.jsonl").read_text().splitlines()) == 4

    from PIL import Image

    from hdit_train.sample import sample as sample_run

    grid = sample_run(
        str(resumed), str(tmp_path / "grid.png"), class_label=2, n=4, steps=3, cfg=2.0
    )
    assert Image.open(grid).size == (2 * 16 + 3, 2 * 16 + 3)  # 2x2 grid, 1-pixel padding


def _export(tmp_path: Path, n: int = 8, dim: int = 6) -> Path:
    """A Sieve-export-shaped shard: jpg/txt/json + img_emb.npy/txt_emb.npy + manifest.json."""
    from PIL import Image

    out = tmp_path / "export"
    out.mkdir()
    rng = np.random.default_rng(0)
    with tarfile.open(out / "00000.tar", "w") as tar:
        for i in range(n):
            key = f"{i:09d}"
            img = Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))
            buf = io.BytesIO()
            img.save(buf, format="JPEG")
            emb = rng.normal(size=dim).astype(np.float16)
            npy = io.BytesIO()
            np.save(npy, emb / np.linalg.norm(emb))
            members = {
                "jpg": buf.getvalue(),
                "txt": b"a thing",
                "json": b"{}",
                "img_emb.npy": npy.getvalue(),
                "txt_emb.npy": npy.getvalue(),
            }
            if i == 3:
                members["jpg"] = b"not a jpeg"
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (out / "manifest.json").write_text(
        json.dumps(
            {
                "format": "webdataset",
                "spec_hash": "abc123",
                "clip_model": "sieve-tiny",
                "dim": dim,
                "count": n,
            }
        )
    )
    return out


def test_export_format_reads_embeddings_and_skips_bad_samples(tmp_path):
    from hdit_train.data import (
        ShardStream,
        batches,
        manifest_clip_spec,
        manifest_spec_hash,
        read_manifest,
    )

    export = _export(tmp_path)
    manifest = read_manifest(export)
    assert manifest_spec_hash(manifest) == "abc123" and manifest_clip_spec(manifest) == "sieve-tiny"
    stream = ShardStream(export, 16, cond="clip", shuffle_buffer=1)
    batch = next(batches(stream.iterate(), 7))
    assert batch["image"].shape == (7, 3, 16, 16) and batch["emb"].shape == (7, 6)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert stream.failed == 1  # the corrupt jpeg is counted, not fatal


def test_a_manifest_without_the_export_keys_is_named_not_guessed(tmp_path):
    from hdit_train.data import read_manifest

    export = _export(tmp_path)
    (export / "manifest.json").write_text(json.dumps({"hash": "abc123", "clip": "sieve-tiny"}))
    with pytest.raises(ValueError, match="manifest.json: not a curation.export manifest"):
        read_manifest(export)


def test_trainer_conditions_on_stored_clip_embeddings(tmp_path):
    from hdit_train.data import ShardStream, batches
    from hdit_train.run import load_config
    from hdit_train.train_loop import Trainer

    cfg = load_config(_config(tmp_path))
    cfg["cond"] = {**cfg["cond"], "kind": "clip", "dropout": 0.5}
    trainer = Trainer(cfg, cond_dim=6)
    batch = next(batches(ShardStream(_export(tmp_path), 16, cond="clip").iterate(), 4))
    kwargs = trainer._cond_inputs(batch)
    dropped = (kwargs["mapping_cond"] == 0).all(1)
    assert kwargs["mapping_cond"].shape == (4, 6) and 0 <= int(dropped.sum()) <= 4
    assert np.isfinite(trainer.train_step(batch))


def test_demo_colour_scorer_reads_real_scenes():
    """The bench's prompt-colour metric must name the true colour of generated ground truth."""
    from bench.hdit import scorer_accuracy

    assert scorer_accuracy(n=60) >= 0.8


class _StubEncoder:
    """Image embedding = +e0, text embedding = +e1: the gap is exactly e0 - e1."""

    dim = 4

    def encode_images(self, images):
        return np.tile(np.array([1, 0, 0, 0], np.float32), (len(images), 1))

    def encode_texts(self, texts):
        return np.tile(np.array([0, 1, 0, 0], np.float32), (len(texts), 1))

    def encode_image_tensor(self, batch):
        return self.encode_images(list(batch))


def test_modality_gap_from_plain_shards_and_prompt_shift(shards):
    from hdit_train.data import modality_gap
    from hdit_train.sampling import cond_kwargs

    gap = modality_gap(shards, _StubEncoder(), n=10)
    np.testing.assert_allclose(gap, [1, -1, 0, 0])
    cfg = {"cond": {"kind": "clip"}}
    plain, _ = cond_kwargs(cfg, 2, _StubEncoder(), ["a red circle"])
    shifted, uncond = cond_kwargs(cfg, 2, _StubEncoder(), ["a red circle"], clip_gap=gap)
    assert torch.allclose(plain["mapping_cond"][0], torch.tensor([0.0, 1, 0, 0]))
    # text + gap = the image embedding: the prompt lands where training conditions lived
    assert torch.allclose(shifted["mapping_cond"][0], torch.tensor([1.0, 0, 0, 0]))
    assert (uncond["mapping_cond"] == 0).all()


def test_condition_noise_perturbs_but_keeps_unit_norm(tmp_path):
    from hdit_train.data import ShardStream, batches
    from hdit_train.run import load_config
    from hdit_train.train_loop import Trainer

    cfg = load_config(_config(tmp_path))
    cfg["cond"] = {**cfg["cond"], "kind": "clip", "dropout": 0.0, "noise": 0.5}
    batch = next(batches(ShardStream(_export(tmp_path), 16, cond="clip").iterate(), 4))
    out = Trainer(cfg, cond_dim=6)._cond_inputs(batch)["mapping_cond"]
    emb = batch["emb"] / batch["emb"].norm(dim=1, keepdim=True)
    cos = (out * emb).sum(1)
    assert torch.allclose(out.norm(dim=1), torch.ones(4), atol=1e-5)
    assert (cos < 0.999).all() and (cos > 0.8).all()


@pytest.mark.parametrize("text_prob,expected", [(0.0, [1.0, 0, 0, 0]), (1.0, [0.0, 1, 0, 0])])
def test_text_prob_conditions_on_caption_embeddings(shards, tmp_path, text_prob, expected):
    """cond.text_prob: that fraction of samples is conditioned on its caption's text embedding."""
    from hdit_train.data import ShardStream, batches
    from hdit_train.run import load_config
    from hdit_train.train_loop import Trainer, _embed_missing

    cfg = load_config(_config(tmp_path))
    cfg["cond"] = {
        **cfg["cond"],
        "kind": "clip",
        "dropout": 0.0,
        "noise": 0.0,
        "text_prob": text_prob,
    }
    stream = ShardStream(shards, 16, cond="clip", clip_preprocess=lambda pil: torch.zeros(3, 4, 4))
    batch = next(batches(stream.iterate(), 4))
    assert len(batch["captions"]) == 4 and all(batch["captions"])
    _embed_missing(batch, _StubEncoder(), captions=text_prob > 0)
    cond = Trainer(cfg, cond_dim=4)._cond_inputs(batch)["mapping_cond"]
    assert torch.allclose(cond, torch.tensor(expected).expand(4, 4))
