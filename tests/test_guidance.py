"""CLIP guidance (VQGAN-CLIP's algorithm): the loss and its prompts, cutouts, a few guided steps
raising the similarity to the prompt for each generator, editing,
and bad input as one-line errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from hdit_train.guide_diffusion import HDiTGuidance
from hdit_train.guide_loss import (
    GuidanceError,
    MakeCutouts,
    Prompt,
    parse_guidance_prompts,
    range_loss,
    spherical_dist_loss,
    tv_loss,
)
from hdit_train.guide_runner import Guide, GuideSettings
from models.prompts import PromptError
from models.scenes import make_sample
from models.vqgan import VQGAN, save_taming
from tests.test_hdit import TINY_MODEL

FEW = GuideSettings(steps=8, cutn=4, hdit=HDiTGuidance(steps=4))


def test_spherical_distance_is_the_squared_half_angle_times_two():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    y = torch.tensor([[0.0, 2.0], [-1.0, 0.0], [1.0, 0.0]])
    expected = torch.tensor([2 * (math.pi / 4) ** 2, 2 * (math.pi / 2) ** 2, 0.0])
    assert torch.allclose(spherical_dist_loss(x, y), expected, atol=1e-6)


def test_prompt_weights_push_and_stops_end_the_pull():
    target = torch.tensor([[1.0, 0.0]])
    emb = torch.tensor([[[0.6, 0.8]]], requires_grad=True)  # (cutn 1, n 1, dim 2)
    Prompt(target, 1.0)(emb).sum().backward()
    pull = emb.grad.clone()
    emb.grad = None
    Prompt(target, -0.5)(emb).sum().backward()
    assert torch.allclose(emb.grad, -0.5 * pull)  # a negative weight pushes, scaled by its size
    emb.grad = None
    loss = Prompt(target, 1.0, stop=10.0)(emb)
    loss.sum().backward()
    # below its stop the loss no longer pulls
    assert loss.item() > 0 and torch.count_nonzero(emb.grad) == 0


def test_tv_and_range_losses():
    flat, noisy = torch.zeros(1, 3, 8, 8), torch.rand(1, 3, 8, 8)
    assert tv_loss(flat).item() == 0 and tv_loss(noisy).item() > 0
    assert range_loss(noisy).item() == 0 and range_loss(noisy + 2).item() > 0


def test_cutouts_are_deterministic_per_generator_and_in_range():
    cut = MakeCutouts(cut_size=16, cutn=5, cut_pow=1.0)
    images = torch.rand(2, 3, 40, 32)
    a = cut(images, torch.Generator().manual_seed(3))
    b = cut(images, torch.Generator().manual_seed(3))
    assert a.shape == (10, 3, 16, 16) and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, cut(images, torch.Generator().manual_seed(4)))


def test_guidance_prompts_share_the_one_parser():
    texts, images = parse_guidance_prompts("a red star:1|blurry:-0.5", "a.png:0.5")
    assert [(p.text, p.weight) for p in texts] == [("a red star", 1.0), ("blurry", -0.5)]
    assert [(p.text, p.weight) for p in images] == [("a.png", 0.5)]
    assert parse_guidance_prompts(None, "b.png")[0] == []
    for bad, named in [
        (("blurry:-1", None), "positive weight"),
        ((None, None), "no prompt"),
        (("a:x", None), "'x' is not a number"),
        (("a|:2", None), "empty text"),
    ]:
        with pytest.raises(PromptError, match=named):
            parse_guidance_prompts(*bad)


# ---------------------------------------------------------------- generators


@pytest.fixture(scope="module")
def vqgan_files(tmp_path_factory) -> tuple[Path, Path]:
    """A random-weight taming-format VQGAN (factor 4), as a user's model.yaml + last.ckpt."""
    torch.manual_seed(0)
    dd = {
        "double_z": False,
        "z_channels": 16,
        "resolution": 64,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 32,
        "ch_mult": [1, 1, 2],
        "num_res_blocks": 1,
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    # a dense codebook: a few steps cross code boundaries
    model = VQGAN(dd, n_embed=256, embed_dim=4)
    with torch.no_grad():
        model.quantize.embedding.weight.normal_()
    return save_taming(model, tmp_path_factory.mktemp("vqgan"))


@pytest.fixture(scope="module")
def hdit_run(tmp_path_factory) -> Path:
    """A tiny HDiT run conditioned on sieve-tiny embeddings, trained for a few steps."""
    from hdit_train.train import train
    from pipelines.generate import write_sample_dataset

    root = tmp_path_factory.mktemp("hdit")
    write_sample_dataset(root / "shards", 16, size=32, seed=0, shard_size=16)
    cfg = {
        "model": TINY_MODEL,
        "cond": {"kind": "clip", "clip_spec": "sieve-tiny", "text_prob": 0.5},
        "data": {"size": 16, "shuffle_buffer": 8},
        "train": {
            "batch_size": 4,
            "max_steps": 3,
            "warmup_steps": 1,
            "log_every": 1,
            "ckpt_every": 0,
            "sample_every": 0,
            "compile": False,
        },
        "sample": {"n": 2, "steps": 2},
    }
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return train(str(root / "shards"), str(root / "cfg.yaml"), str(root / "run"))


@pytest.fixture(scope="module")
def guides(tiny_clip, vqgan_files, hdit_run) -> dict[str, Guide]:
    return {
        "pixels": Guide("pixels", tiny_clip, device="cpu"),
        "vqgan": Guide("vqgan", tiny_clip, *vqgan_files, device="cpu"),
        "hdit": Guide("hdit", tiny_clip, hdit_ckpt=hdit_run, device="cpu"),
    }


@pytest.mark.parametrize("generator", ["pixels", "vqgan", "hdit"])
def test_a_few_guided_steps_raise_similarity_to_the_prompt(guides, generator):
    g = guides[generator]
    settings = GuideSettings(steps=8, cutn=4)
    settings.hdit.steps, settings.hdit.clip_scale = (
        6,
        200.0,
    )  # a 16² image: each pixel feeds many CLIP inputs
    size = 16 if generator == "hdit" else 32
    prompt = "a red circle on a blue background"
    unguided = g.run(prompt, seed=1, size=size, settings=settings, guided=False)
    guided = g.run(prompt, seed=1, size=size, settings=settings)
    assert (
        guided.image.shape == (1, 3, size, size)
        and 0 <= guided.image.min()
        and guided.image.max() <= 1
    )
    assert guided.similarity > unguided.similarity + 0.05, (guided.similarity, unguided.similarity)
    again = g.run(prompt, seed=1, size=size, settings=settings)
    assert torch.equal(again.image, guided.image)  # seeded


def test_hdit_guidance_works_with_and_without_the_run_s_own_conditioning(guides):
    g = guides["hdit"]
    on, off = GuideSettings(), GuideSettings()
    for s, cond in ((on, True), (off, False)):
        s.hdit.steps, s.hdit.use_cond, s.hdit.clip_scale = 4, cond, 0.0
    with_cond = g.run("a red circle", seed=0, settings=on).image
    without = g.run("a red circle", seed=0, settings=off).image
    assert not torch.equal(with_cond, without)  # the run's conditioning is used only when asked


def test_editing_stays_closer_to_the_init_with_an_init_weight(guides, tmp_path):
    init = make_sample(0, size=32, seed=5).image
    path = tmp_path / "init.png"
    init.save(path)
    loose = GuideSettings(steps=10, cutn=4, pixel_param="raw", step_size=0.2)
    tight = GuideSettings(steps=10, cutn=4, pixel_param="raw", step_size=0.2, init_weight=50.0)
    g = guides["pixels"]
    a = g.run("a yellow star", seed=0, size=32, init=path, settings=loose).image
    b = g.run("a yellow star", seed=0, size=32, init=path, settings=tight).image
    start = torch.from_numpy(__import__("numpy").asarray(init, "float32") / 255).permute(2, 0, 1)[
        None
    ]
    assert (b - start).abs().mean() < (a - start).abs().mean()
    for name in ("vqgan", "hdit"):  # the other generators take an init image too
        out = guides[name].run(
            "a yellow star", seed=0, size=16 if name == "hdit" else 32, init=path, settings=FEW
        )
        assert out.image.shape[-1] == (16 if name == "hdit" else 32)


def test_bad_input_is_a_one_line_error_naming_it(guides, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    cases = [
        (lambda: guides["pixels"].run("a red star", init=broken, settings=FEW), "broken.png"),
        (
            lambda: guides["pixels"].run("a red star", init=tmp_path / "nope.png", settings=FEW),
            "no such file",
        ),
        (lambda: guides["vqgan"].run("a red star", size=30, settings=FEW), "multiples of 4"),
        (lambda: guides["hdit"].run("a red star", size=18, settings=FEW), "multiples of 4"),
        (
            lambda: guides["pixels"].run("a red star", image_prompts=str(broken), settings=FEW),
            "broken.png",
        ),
        (lambda: Guide("gan"), "choose one of"),
    ]
    for call, named in cases:
        with pytest.raises(GuidanceError, match=named) as err:
            call()
        assert "\n" not in str(err.value)


def test_the_command_writes_frames_and_a_grid_and_refuses_bad_prompts(
    tmp_path, capsys, vqgan_files
):
    from hdit_train.guide import main

    out = tmp_path / "out.png"
    main(
        [
            "--prompts",
            "a green star",
            "--generator",
            "vqgan",
            "--vqgan-config",
            str(vqgan_files[0]),
            "--vqgan-ckpt",
            str(vqgan_files[1]),
            "--size",
            "32",
            "--steps",
            "3",
            "--cutn",
            "2",
            "--seed",
            "0",
            "1",
            "--save-every",
            "2",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert Image.open(out).size == (2 * 32 + 3, 32 + 2)  # two seeds side by side, 1-pixel padding
    assert {p.name for p in tmp_path.iterdir()} >= {
        "out.png",
        "out_seed0.png",
        "out_seed1.png",
        "out_frames",
    }
    assert sorted(p.name for p in (tmp_path / "out_frames").iterdir()) == [
        "seed0_step0000.png",
        "seed0_step0002.png",
        "seed1_step0000.png",
        "seed1_step0002.png",
    ]
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "--prompts",
                "a red star:heavy",
                "--generator",
                "pixels",
                "--out",
                str(tmp_path / "x.png"),
            ]
        )
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "'heavy' is not a number" in err
