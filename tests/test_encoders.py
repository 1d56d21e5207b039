"""load_clip: spec parsing and clear errors, local-dir round trip,
and the tiny CLIP's ranking quality."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.cache import cache_dir
from models.clip import load_clip

REPO = Path(__file__).resolve().parent.parent


def test_cache_dir_honours_env_and_is_created(tmp_path, monkeypatch):
    target = tmp_path / "nested" / "cache"
    monkeypatch.setenv("SIEVE_CACHE", str(target))
    assert cache_dir() == target
    assert target.is_dir()


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "sieve-huge",
        "clip:ViT-B-32",
        "open_clip:",
        "open_clip:NoSuchArch/x",
        "open_clip:ViT-B-32/no_such_tag",
        "local-dir:",
    ],
)
def test_bad_spec_is_a_clear_value_error(spec):
    with pytest.raises(ValueError) as err:
        load_clip(spec, device="cpu")
    msg = str(err.value)
    assert repr(spec.strip()) in msg and "Accepted forms" in msg and "local-dir:" in msg


def test_local_dir_without_config_names_the_folder(tmp_path):
    with pytest.raises(ValueError, match="open_clip_config.json"):
        load_clip(f"local-dir:{tmp_path}", device="cpu")


def test_missing_checkpoint_file_is_named():
    with pytest.raises(FileNotFoundError, match="no/such/ckpt.pt"):
        load_clip("open_clip:ViT-B-32/no/such/ckpt.pt", device="cpu")


def test_bad_precision_and_batch_size():
    with pytest.raises(ValueError, match="precision"):
        load_clip("sieve-tiny", precision="fp8")
    with pytest.raises(ValueError, match="batch_size"):
        load_clip("sieve-tiny", batch_size=0)


def test_hub_spec_offline_fails_fast_with_instructions():
    """A real pretrained tag cannot be fetched here: the error says so and
    how to pass a checkpoint."""
    code = (
        "from models.clip import load_clip\n"
        "try:\n    load_clip('open_clip:ViT-B-32/laion2b_s34b_b79k', device='cpu')\n"
        "except RuntimeError as e:\n    print('ERR', e)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=180
    )
    assert "ERR" in out.stdout, out.stderr[-2000:]
    assert "open_clip:ViT-B-32/laion2b_s34b_b79k" in out.stdout
    assert "cannot be downloaded" in out.stdout and "path/to/checkpoint.pt" in out.stdout


def _held_out(n, seed=4242):
    from models.scenes import iter_samples

    return list(iter_samples(n, size=64, seed=seed))


def test_outputs_are_normalised_float32(tiny_clip):
    samples = _held_out(5)
    img = tiny_clip.encode_images([s.image for s in samples])
    txt = tiny_clip.encode_texts([s.caption for s in samples])
    for arr in (img, txt):
        assert arr.dtype == np.float32 and arr.shape == (5, tiny_clip.dim)
        np.testing.assert_allclose(np.linalg.norm(arr, axis=1), 1.0, atol=1e-5)
    assert tiny_clip.encode_texts([]).shape == (0, tiny_clip.dim)


def test_image_tensor_path_matches_pil_path(tiny_clip):
    import torch

    images = [s.image for s in _held_out(6)]
    batch = torch.stack([tiny_clip.preprocess(im) for im in images])
    np.testing.assert_allclose(
        tiny_clip.encode_image_tensor(batch), tiny_clip.encode_images(images), atol=1e-6
    )


def test_batching_does_not_change_embeddings(tiny_clip):
    small = load_clip(f"local-dir:{tiny_clip_dir()}", device="cpu", batch_size=2)
    samples = _held_out(5)
    np.testing.assert_allclose(
        small.encode_texts([s.caption for s in samples]),
        tiny_clip.encode_texts([s.caption for s in samples]),
        atol=1e-5,
    )


def test_bf16_is_close_to_fp32(tiny_clip):
    bf16 = load_clip("sieve-tiny", device="cpu", precision="bf16")
    samples = _held_out(8)
    a = tiny_clip.encode_images([s.image for s in samples])
    b = bf16.encode_images([s.image for s in samples])
    assert b.dtype == np.float32
    assert (a * b).sum(1).min() > 0.98


def tiny_clip_dir() -> Path:
    from models.clip import tiny_dir

    return tiny_dir()


def test_save_reload_round_trip_gives_identical_embeddings(tiny_clip, tmp_path):
    """Save the model as an open_clip local-dir folder; both load paths
    reproduce the embeddings exactly."""
    from safetensors.torch import save_file

    folder = tmp_path / "copy"
    folder.mkdir()
    shutil.copy(tiny_clip_dir() / "open_clip_config.json", folder)
    save_file(
        {k: v.contiguous() for k, v in tiny_clip.model.state_dict().items()},
        str(folder / "open_clip_model.safetensors"),
    )
    again = load_clip(f"local-dir:{folder}", device="cpu")
    samples = _held_out(10)
    images, captions = [s.image for s in samples], [s.caption for s in samples]
    np.testing.assert_array_equal(again.encode_images(images), tiny_clip.encode_images(images))
    np.testing.assert_array_equal(again.encode_texts(captions), tiny_clip.encode_texts(captions))
    assert (
        again.dim == tiny_clip.dim
        and json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    )


def test_open_clip_itself_reads_the_tiny_folder(tiny_clip):
    import open_clip
    import torch

    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tiny_clip_dir()}")
    for (name, a), (_, b) in zip(model.state_dict().items(), tiny_clip.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_tiny_clip_ranks_own_caption_first(tiny_clip):
    """For held-out images, the true caption beats 9 captions naming another colour or shape."""
    samples = _held_out(300)
    rng = np.random.default_rng(0)
    queries = samples[:50]
    img = tiny_clip.encode_images([s.image for s in queries])
    wins = 0
    for i, s in enumerate(queries):
        pool = [
            o
            for o in samples[50:]
            if (o.attrs["color"], o.attrs["shape"]) != (s.attrs["color"], s.attrs["shape"])
        ]
        picks = rng.choice(len(pool), size=9, replace=False)
        captions = [s.caption] + [pool[j].caption for j in picks]
        wins += int(np.argmax(tiny_clip.encode_texts(captions) @ img[i]) == 0)
    assert wins >= 45, f"{wins}/50 images ranked their own caption first"


def test_shape_swapped_negative_changes_only_the_shape_noun():
    """Hard negatives for sieve-tiny training: same caption, another shape, number kept."""
    from models.tiny_clip import swap_shape

    attrs = {"shape": "cross", "count": 2}
    assert (
        swap_shape("two small red crosses on a blue background", attrs, "star")
        == "two small red stars on a blue background"
    )
    assert (
        swap_shape(
            "a photo of a green circle at the top", {"shape": "circle", "count": 1}, "diamond"
        )
        == "a photo of a green diamond at the top"
    )
    with pytest.raises(ValueError, match="does not name its shape"):
        swap_shape("a red blob", {"shape": "circle", "count": 1}, "star")


def test_tiny_clip_tells_shapes_apart_when_colour_is_fixed(tiny_clip):
    """Captions that differ only in shape: the true one ranks first for most held-out images."""
    from models.scenes import SHAPES

    samples = [s for s in _held_out(200) if s.attrs["size"] != "small"][:60]
    img = tiny_clip.encode_images([s.image for s in samples])
    wins = 0
    for i, s in enumerate(samples):
        prompts = [f"a {s.attrs['color']} {shape}" for shape in SHAPES]
        wins += int(
            SHAPES[int(np.argmax(tiny_clip.encode_texts(prompts) @ img[i]))] == s.attrs["shape"]
        )
    assert wins >= 0.7 * len(samples), (
        f"{wins}/{len(samples)} shapes named right (chance is 1/{len(SHAPES)})"
    )
