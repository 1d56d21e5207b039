"""The taming-format VQGAN: checkpoints written the way taming's training writes them load and
decode, a config/checkpoint mismatch is one clear error, and quantisation is straight-through."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import yaml

from models.vqgan import (
    VQGAN,
    VQGANError,
    load_vqgan,
    nearest_code,
    read_config,
    save_taming,
    taming_config,
    vector_quantize,
)

#: a small taming config with every kind of block: two levels, a downsample,
#: a shortcut, attention at 8
SMALL = {
    "double_z": False,
    "z_channels": 8,
    "resolution": 16,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [8],
    "dropout": 0.0,
}
#: sha256 of the sorted "key shape" lines of taming's own VQModel (taming-transformers-rom1504
#: 0.0.6's Encoder and Decoder, plus VectorQuantizer2 and the two 1x1 convs) for SMALL with n_embed
#: 16, embed_dim 8
TAMING_KEYS_SHA256 = "8533212cef6308fe7e78e5d1c2bc593bfd9bfa240722462f116b879bbfe85bf8"


class ModelCheckpoint:
    """Stands in for a Lightning callback class that old checkpoints pickle by reference."""

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor


def _random_vqgan(seed: int = 0, **changes) -> VQGAN:
    torch.manual_seed(seed)
    model = VQGAN({**SMALL, **changes}, n_embed=16, embed_dim=8)
    with torch.no_grad():
        for p in model.parameters():
            # off the zero/one initialisation, so a wrong load shows
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_state_dict_keys_are_taming_s():
    keys = sorted(f"{k} {tuple(v.shape)}" for k, v in _random_vqgan().state_dict().items())
    assert len(keys) == 155
    assert hashlib.sha256("\n".join(keys).encode()).hexdigest() == TAMING_KEYS_SHA256


def test_a_taming_format_checkpoint_loads_and_decodes(tmp_path: Path):
    model = _random_vqgan()
    # as a Lightning checkpoint of taming's training: the loss's and discriminator's weights beside
    # the model's, optimizer states, and a callback pickled by class
    # (weights-only loading refuses it)
    extra = {
        "loss.logvar": torch.zeros(()),
        "loss.discriminator.main.0.weight": torch.randn(64, 3, 4, 4),
        "loss.perceptual_loss.lin0.model.1.weight": torch.randn(1, 64, 1, 1),
    }
    config, ckpt = save_taming(
        model,
        tmp_path,
        extra_state=extra,
        epoch=3,
        global_step=1200,
        optimizer_states=[{"state": {}}],
        callbacks={ModelCheckpoint: {"best": 0.1}},
        hyper_parameters=ModelCheckpoint("val/rec_loss"),
    )
    doc = yaml.safe_load(config.read_text())
    assert doc["model"]["target"] == "taming.models.vqgan.VQModel"
    assert doc["model"]["params"][
        "lossconfig"
    ]  # taming's own configs carry it; the loader ignores it
    loaded = load_vqgan(config, ckpt)
    # any multiple of the factor, not only the config's resolution
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        z_q, _, idx = loaded.encode(x)
        assert z_q.shape == (2, 8, 8, 12) and idx.shape == (2, 8, 12)
        assert torch.equal(loaded.decode(z_q), model.decode(z_q))
        assert loaded.decode(z_q).shape == (2, 3, 16, 24)
    assert loaded.factor == 2
    assert not any(p.requires_grad for p in loaded.parameters())


def test_a_bare_state_dict_file_loads_too(tmp_path: Path):
    model = _random_vqgan()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    config = tmp_path / "model.yaml"
    config.write_text(yaml.safe_dump(taming_config(SMALL, 16, 8)))
    assert torch.equal(load_vqgan(config, tmp_path / "weights.pt").codebook, model.codebook)


def test_a_config_checkpoint_pair_that_does_not_match_is_one_clear_error(tmp_path: Path):
    _, ckpt = save_taming(_random_vqgan(), tmp_path / "a")
    other, _ = save_taming(_random_vqgan(ch_mult=[1, 1]), tmp_path / "b")
    with pytest.raises(VQGANError, match="does not match config") as err:
        load_vqgan(other, ckpt)
    assert "shape mismatches" in str(err.value) and "\n" not in str(err.value)
    deeper, _ = save_taming(_random_vqgan(ch_mult=[1, 2, 2]), tmp_path / "c")
    with pytest.raises(VQGANError, match="missing keys"):
        load_vqgan(deeper, ckpt)


@pytest.mark.parametrize(
    "content, named",
    [
        ("model: [1, 2", "not YAML"),
        ("data: {}", "no model.params"),
        ("model: {target: taming.models.vqgan.GumbelVQ, params: {}}", "GumbelVQ' is not supported"),
        (
            "model: {params: {n_embed: 16, embed_dim: 8, ddconfig: {ch: 32}}}",
            "lacks ddconfig.out_ch",
        ),
    ],
)
def test_bad_configs_name_the_problem(tmp_path: Path, content: str, named: str):
    path = tmp_path / "model.yaml"
    path.write_text(content)
    with pytest.raises(VQGANError, match=named):
        read_config(path)


def test_unreadable_checkpoints_name_the_file(tmp_path: Path):
    config, _ = save_taming(_random_vqgan(), tmp_path)
    bad = tmp_path / "broken.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(VQGANError, match="broken.ckpt: cannot be read"):
        load_vqgan(config, bad)
    with pytest.raises(VQGANError, match="no such file"):
        load_vqgan(config, tmp_path / "absent.ckpt")


def test_quantisation_passes_gradients_straight_through():
    torch.manual_seed(0)
    codebook = torch.randn(10, 4)
    z = torch.randn(3, 5, 4, requires_grad=True)
    q = vector_quantize(z, codebook)
    # the forward snaps to codes
    assert torch.equal(q.detach(), codebook[nearest_code(z.detach(), codebook)])
    weights = torch.randn(3, 5, 4)
    (q * weights).sum().backward()
    assert torch.equal(z.grad, weights)  # the backward is the identity
    model = _random_vqgan()
    z = torch.randn(1, 8, 4, 4, requires_grad=True)
    z_q, loss, _ = model.quantize(z)
    z_q.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z)) and loss > 0


def test_the_bundled_trainer_writes_taming_files(tmp_path: Path):
    from models.cache import BUNDLED
    from models.vqgan_train import train

    bundled = BUNDLED["sieve-vqgan"]
    knobs = {"steps": 2, "n_samples": 16, "batch_size": 4, "crop": 16}
    out = train(tmp_path / "vq", **{**bundled.defaults, **knobs})
    model = load_vqgan(out / "model.yaml", out / "last.ckpt")
    assert model.factor == 2 ** (bundled.defaults["levels"] - 1)
    assert bundled.trained_recipe(out) == bundled.recipe(**knobs)
    with torch.no_grad():
        assert model.decode(model.encode(torch.zeros(1, 3, 64, 64))[0]).shape == (1, 3, 64, 64)
