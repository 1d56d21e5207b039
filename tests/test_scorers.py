"""pipelines.scorers: the shared interface, NSFW robustness,
toxicity ranking, watermark separation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from collection.schema import PTOXIC, PUNSAFE, PWATERMARK
from pipelines.scorers import SCORER_NAMES, load_scorer


def test_unknown_scorer_names_the_valid_ones() -> None:
    with pytest.raises(ValueError) as err:
        load_scorer("aesthetic")
    for name in SCORER_NAMES:
        assert name in str(err.value)


@pytest.fixture(scope="module")
def nsfw():
    return load_scorer("nsfw")


@pytest.fixture(scope="module")
def toxicity():
    return load_scorer("toxicity", backend="lexicon")


def test_interface_columns_and_kinds(nsfw, toxicity, watermark) -> None:
    assert (nsfw.column, nsfw.kind) == (PUNSAFE, "image")
    assert (toxicity.column, toxicity.kind) == (PTOXIC, "text")
    assert (watermark.column, watermark.kind) == (PWATERMARK, "image")
    assert SCORER_NAMES == ("nsfw", "watermark", "toxicity")


def _odd_images() -> list:
    return [
        Image.new("RGB", (1, 1), (255, 200, 180)),
        Image.new("L", (31, 17), 128),
        Image.new("RGBA", (64, 64), (10, 20, 30, 0)),
        Image.new("CMYK", (40, 90), (0, 50, 100, 0)),
        Image.new("P", (12, 12)),
        Image.new("I;16", (20, 20)),
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 50, 3), dtype=np.uint8)),
    ]


def test_nsfw_batch_of_odd_images_gives_probabilities(nsfw) -> None:
    scores = nsfw.score(_odd_images())
    assert scores.dtype == np.float32 and scores.shape == (7,)
    assert np.all((scores >= 0) & (scores <= 1))


def test_nsfw_single_thread_session_scores_the_same(nsfw) -> None:
    images = _odd_images()
    np.testing.assert_allclose(
        load_scorer("nsfw", threads=1).score(images), nsfw.score(images), atol=1e-5
    )


def test_nsfw_unreadable_item_is_nan_not_a_crash(nsfw) -> None:
    scores = nsfw.score([Image.new("RGB", (8, 8)), b"not an image"])
    assert 0 <= scores[0] <= 1 and np.isnan(scores[1])


def test_nsfw_detection_mapping() -> None:
    from pipelines.scorers.nsfw import combine_detections

    assert combine_detections([]) == 0.0
    assert combine_detections([{"class": "FACE_FEMALE", "score": 0.99}]) == 0.0
    exposed = combine_detections([{"class": "FEMALE_GENITALIA_EXPOSED", "score": 0.8}])
    covered = combine_detections([{"class": "FEMALE_GENITALIA_COVERED", "score": 0.8}])
    assert exposed == pytest.approx(0.8) and 0 < covered < exposed


def test_nsfw_clip_head_from_npz_and_state_dict(tmp_path) -> None:
    import torch

    rng = np.random.default_rng(0)
    w0, w1 = rng.normal(size=(8, 4)).astype(np.float32), rng.normal(size=(1, 8)).astype(np.float32)
    np.savez(
        tmp_path / "head.npz",
        W0=w0.T,
        b0=np.zeros(8, np.float32),
        W1=w1.T,
        b1=np.zeros(1, np.float32),
    )
    torch.save(
        {
            "0.weight": torch.from_numpy(w0),
            "0.bias": torch.zeros(8),
            "2.weight": torch.from_numpy(w1),
            "2.bias": torch.zeros(1),
        },
        tmp_path / "head.pt",
    )
    emb = rng.normal(size=(5, 4)).astype(np.float32)
    a = load_scorer("nsfw", clip_head_path=tmp_path / "head.npz")
    b = load_scorer("nsfw", clip_head_path=tmp_path / "head.pt")
    assert a.needs_embeddings
    expected = 1 / (1 + np.exp(-(np.maximum(emb @ w0.T, 0) @ w1.T)[:, 0]))
    np.testing.assert_allclose(a.score([None] * 5, embeddings=emb), expected, rtol=1e-5)
    np.testing.assert_allclose(b.score([None] * 5, embeddings=emb), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="embeddings"):
        a.score([None] * 5)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_scorer("nsfw", clip_head_path=tmp_path / "missing.pt")


TOXIC = [
    "f*ck you",
    "you stupid idiot",
    "sh1t photo",
    "kill yourself",
    "what a b!tch",
    "fuuuuck this",
    "F.U.C.K off",
    "go to hell loser",
]
BENIGN = [
    "a red circle on a blue background",
    "the class assassin from Scunthorpe",
    "a cocktail glass",
    "hello shell",
    "passionate analyst",
    "two green stars at the top left",
    "",
    "grass and cockpit",
]


def test_toxicity_ranks_toxic_above_benign(toxicity) -> None:
    scores = toxicity.score(TOXIC + BENIGN)
    toxic, benign = scores[: len(TOXIC)], scores[len(TOXIC) :]
    assert scores.dtype == np.float32 and np.all((scores >= 0) & (scores <= 1))
    assert toxic.min() > benign.max()
    assert np.all(benign == 0)


def test_toxicity_non_string_is_nan(toxicity) -> None:
    scores = toxicity.score(["fine", None, 3])
    assert scores[0] == 0 and np.isnan(scores[1]) and np.isnan(scores[2])


def test_toxicity_missing_detoxify_falls_back(monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_detoxify(name, *args, **kwargs):
        if name == "detoxify":
            raise ImportError("no detoxify here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_detoxify)
    assert load_scorer("toxicity").backend == "lexicon"
    with pytest.raises(RuntimeError, match="Detoxify"):
        load_scorer("toxicity", backend="detoxify")


@pytest.fixture(scope="module")
def watermark(tmp_path_factory):
    """A quickly trained detector (few steps): enough to separate in-distribution overlays."""
    from models.cache import BUNDLED
    from models.watermark_cnn import MODEL_FILE, train

    recipe = {**BUNDLED["watermark"].defaults, "steps": TEST_STEPS, "pool": 768, "seed": 0}
    folder = train(tmp_path_factory.mktemp("wm"), **recipe)
    return load_scorer("watermark", model_path=folder / MODEL_FILE)


TEST_STEPS = 120


def test_watermark_separates_watermarked_from_clean(watermark) -> None:
    from bench.watermark import auroc
    from models.overlays import make_example

    examples = [make_example(i, "train", seed=99) for i in range(200)]
    scores = watermark.score([x for x, _ in examples])
    assert scores.dtype == np.float32 and np.all((scores >= 0) & (scores <= 1))
    assert auroc(np.array([y for _, y in examples]), scores) > 0.8


def test_watermark_odd_images_and_unreadable(watermark) -> None:
    scores = watermark.score(_odd_images() + ["not an image"])
    assert np.all((scores[:-1] >= 0) & (scores[:-1] <= 1)) and np.isnan(scores[-1])


def test_watermark_laion_checkpoint_missing_is_clear(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="python -m models.train watermark"):
        load_scorer("watermark", model_path=tmp_path / "absent.pt")
    with pytest.raises(FileNotFoundError, match="watermark_model_v1.pt"):
        load_scorer("watermark", laion_checkpoint=tmp_path / "nope.pt")


def test_watermark_trains_on_first_use_into_cache(monkeypatch, tmp_path) -> None:
    """No cached detector: load_scorer trains one (child process) into the cache, then reuses it.

    A cheap recipe stands in for the default one: the cache's entry is swapped for one whose
    defaults are that recipe, and it trains the child with the same knobs."""
    import dataclasses

    from models import cache, watermark_cnn

    real = cache.BUNDLED["watermark"]
    quick = {"steps": 2, "pool": 64}
    trained: list[Path] = []

    class Quick(cache.Bundled):
        def train_into(self, folder, **overrides):
            trained.append(Path(folder))
            return super().train_into(folder, **{**quick, **overrides})

    monkeypatch.setenv("SIEVE_CACHE", str(tmp_path))
    fields = {f.name: getattr(real, f.name) for f in dataclasses.fields(real)}
    monkeypatch.setitem(
        cache.BUNDLED, "watermark", Quick(**{**fields, "defaults": {**real.defaults, **quick}})
    )
    path = watermark_cnn.model_path()
    assert path == tmp_path / "watermark" / watermark_cnn.MODEL_FILE and path.exists()
    assert trained == [tmp_path / "watermark"]
    assert load_scorer("watermark").score([Image.new("RGB", (64, 64))]).shape == (1,)
    assert watermark_cnn.model_path() == path  # second call reuses, does not retrain
    assert trained == [tmp_path / "watermark"]
