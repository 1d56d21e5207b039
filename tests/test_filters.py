"""curation.filters (the LAION recipe as SQL), pipelines.language (CLD3 at embed time) and the
similarity filter calibrated for sieve-tiny, checked on generated pairs with swapped captions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from bench.synthetic import clustered_vectors, write_collection
from collection import schema as S
from curation import filters as F
from curation.catalog import Catalog

N = 400


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> tuple[str, pd.DataFrame]:
    """A collection whose score columns take values on both sides of every
    threshold (some unscored)."""
    rng = np.random.default_rng(0)
    cols = {
        S.CLIP_SIMILARITY: rng.uniform(0, 1, N).round(3).tolist(),
        S.PUNSAFE: [
            None if i % 10 == 0 else float(v) for i, v in enumerate(rng.uniform(0, 1, N).round(3))
        ],
        S.PWATERMARK: rng.uniform(0, 1, N).round(3).tolist(),
        S.PTOXIC: rng.uniform(0, 1, N).round(3).tolist(),
        S.WIDTH: rng.integers(16, 512, N).tolist(),
        S.HEIGHT: rng.integers(16, 512, N).tolist(),
        S.CAPTION: ["x" * int(k) for k in rng.integers(1, 12, N)],
        S.LANGUAGE: rng.choice(["en", "de", "fr", "und", None], N).tolist(),
    }
    root = str(tmp_path_factory.mktemp("filters") / "c")
    write_collection(
        root,
        [clustered_vectors(N // 2, 8, 3, seed=0), clustered_vectors(N // 2, 8, 3, seed=1)],
        columns=cols,
        failed_per_part=4,
    )
    frame = pd.DataFrame(cols)
    return root, frame


def test_laion_preset_renders_the_recipe():
    assert (
        F.render()
        == F.render("laion", clip_model="sieve-tiny")
        == (
            "(status = 'ok') AND (clip_similarity >= 0.57) AND "
            "(caption_length >= 5) AND "
            "(punsafe IS NULL OR punsafe < 0.5) AND (pwatermark IS NULL OR pwatermark < 0.8) AND "
            "(ptoxic IS NULL OR ptoxic < 0.5)"
        )
    )
    vit = F.render(
        clip_model="open_clip:ViT-B-32/laion2b_s34b_b79k", max_punsafe=None, keep_unscored=False
    )
    assert "clip_similarity >= 0.28" in vit and "punsafe" not in vit and "(ptoxic < 0.5)" in vit
    assert F.render("none") == "TRUE"
    assert F.render("none", min_width=256) == "(width >= 256)"
    assert F.describe("english")["min_similarity"] == 0.57


@pytest.mark.parametrize(
    "call,word",
    [
        (lambda: F.render("laion5b"), "laion5b"),
        (lambda: F.render(max_nsfw=0.1), "max_nsfw"),
        (lambda: F.render(language="english; DROP"), "language"),
        (lambda: F.render(max_punsafe="0.5 OR 1=1"), "max_punsafe"),
        (lambda: F.render(clip_model="open_clip:ViT-L-14/openai"), "min_similarity"),
        (
            lambda: F.render(clip_model="open_clip:ViT-B-32"),
            "ViT-B-32",
        ),  # random weights: no meaningful floor
    ],
)
def test_unknown_names_and_values_are_refused_by_name(call, word):
    with pytest.raises(ValueError, match=word):
        call()


def test_similarity_thresholds_per_model():
    assert F.similarity_threshold("open_clip:ViT-B-32/laion2b_s34b_b79k") == 0.28
    assert F.similarity_threshold("open_clip:ViT-B-32/openai") == 0.28
    assert F.similarity_threshold("sieve-tiny") == F.SIMILARITY_THRESHOLDS["sieve-tiny"]


def _expected(frame: pd.DataFrame, spec: F.FilterSpec) -> int:
    """The filter's meaning, written again in pandas over the ok rows."""
    keep = np.ones(len(frame), dtype=bool)
    sim = (
        F.similarity_threshold(spec.clip_model)
        if spec.min_similarity == "auto"
        else spec.min_similarity
    )
    if sim is not None:
        keep &= frame[S.CLIP_SIMILARITY].to_numpy() >= sim
    if spec.min_caption_length is not None:
        keep &= frame[S.CAPTION].str.len().to_numpy() >= spec.min_caption_length
    for col, limit in (
        (S.PUNSAFE, spec.max_punsafe),
        (S.PWATERMARK, spec.max_pwatermark),
        (S.PTOXIC, spec.max_ptoxic),
    ):
        if limit is not None:
            vals = frame[col].astype(float).to_numpy()
            keep &= (np.isnan(vals) & spec.keep_unscored) | (vals < limit)
    for col, least in ((S.WIDTH, spec.min_width), (S.HEIGHT, spec.min_height)):
        if least is not None:
            keep &= frame[col].to_numpy() >= least
    lang = frame[S.LANGUAGE]
    if spec.language == "english":
        keep &= (lang == "en").to_numpy()
    elif spec.language == "multilingual":
        keep &= (lang.notna() & ~lang.isin(["en", "und"])).to_numpy()
    elif spec.language == "nolang":
        keep &= (lang.isna() | (lang == "und")).to_numpy()
    elif spec.language:
        keep &= lang.isin(spec.language.split(",")).to_numpy()
    return int(keep.sum())


@pytest.mark.parametrize(
    "preset,overrides",
    [
        ("laion", {}),
        ("laion", {"max_punsafe": 0.3, "min_width": 128, "min_height": 64}),
        ("laion", {"keep_unscored": False, "min_similarity": 0.2}),
        ("english", {}),
        ("multilingual", {"min_similarity": None}),
        ("nolang", {"min_caption_length": None}),
        ("none", {"language": "de,fr"}),
        ("none", {"status": "ok"}),
    ],
)
def test_filters_count_what_they_say(scored, preset, overrides):
    root, frame = scored
    spec = F.spec(preset, **overrides)
    with Catalog(root) as cat:
        got = cat.count(F.render(preset, **overrides))
    assert got == _expected(frame, spec)  # failed rows: status != 'ok', or (de,fr) no language


def test_language_split_covers_every_row_once(scored):
    root, frame = scored
    with Catalog(root) as cat:
        parts = [cat.count(F.render("none", language=s)) for s in F.LANGUAGE_SPLITS]
        assert sum(parts) == cat.count()


@pytest.mark.parametrize(
    "text,lang",
    [
        ("two small red circles on a blue background in the top left corner", "en"),
        ("zwei kleine rote Kreise auf einem blauen Hintergrund in der oberen linken Ecke", "de"),
        ("deux petits cercles rouges sur un fond bleu dans le coin supérieur gauche", "fr"),
        ("蓝色背景上的两个红色小圆圈", "zh"),
        ("IMG_2031.jpg", "und"),
    ],
)
def test_cld3_languages(text, lang):
    from pipelines.language import detect, detect_languages

    got, score = detect(text)
    assert got == lang and 0 <= score <= 1
    rows = [{S.CAPTION: text}, {S.CAPTION: None}, {S.CAPTION: "  "}]
    detect_languages(rows)
    assert rows[0][S.LANGUAGE] == lang and S.LANGUAGE not in rows[1] and S.LANGUAGE not in rows[2]


@pytest.fixture(scope="module")
def swapped(tmp_path_factory, tiny_clip) -> str:
    """Generated pairs, a fifth with swapped captions, embedded with sieve-tiny."""
    from pipelines.embed import embed
    from pipelines.generate import write_sample_dataset

    root = tmp_path_factory.mktemp("swapped")
    write_sample_dataset(
        root / "shards", 400, size=64, seed=11, mismatch_fraction=0.2, shard_size=200
    )
    embed(str(root / "shards"), str(root / "coll"), workers=1)
    return str(root / "coll")


def test_calibrated_similarity_filter_removes_swapped_captions(swapped):
    with Catalog(swapped) as cat:
        rows = cat.query(
            "SELECT mismatched, caption_of, clip_similarity FROM samples WHERE status = 'ok'"
        ).table
        kept = cat.query(
            "SELECT mismatched, count(*) AS n FROM samples "
            f"WHERE {F.render('none', min_similarity='auto')} "
            "AND status = 'ok' GROUP BY 1"
        ).table.to_pylist()
    frame = rows.to_pandas()
    n_swapped, n_matched = int(frame.mismatched.sum()), int((~frame.mismatched).sum())
    assert 40 < n_swapped < 120 and frame.loc[frame.mismatched, "caption_of"].notna().all()
    by = {r["mismatched"]: r["n"] for r in kept}
    # swapped captions removed (bench: filter_mismatch_removed)
    assert 1 - by.get(True, 0) / n_swapped >= 0.85
    assert by.get(False, 0) / n_matched >= 0.9  # matched pairs kept (bench: filter_match_kept)


CAPTIONS = ["abcd", "abcde", "日本語", "日本語です", "héllo", "😀😀😀😀", "😀😀😀😀😀", None]
LONG_ENOUGH = ["abcde", "日本語です", "héllo", "😀😀😀😀😀"]


def test_caption_length_counts_characters_not_bytes(tmp_path):
    """Written with every part (pipelines.embed_writer), and measured by the catalog for
    parts older than the column."""
    root = str(tmp_path / "c")
    write_collection(
        root, [clustered_vectors(len(CAPTIONS), 8, 2, seed=0)], columns={S.CAPTION: CAPTIONS}
    )
    part = pq.read_table(S.CollectionLayout(root).metadata(0))
    assert part.column(S.CAPTION_LENGTH).to_pylist() == [4, 5, 3, 5, 5, 4, 5, None]
    where = F.render("none", min_caption_length=5)
    with Catalog(root) as cat:
        assert (
            cat.query(f"SELECT caption FROM samples WHERE {where} ORDER BY id")
            .table.column(0)
            .to_pylist()
            == LONG_ENOUGH
        )
    # an older part
    pq.write_table(part.drop_columns([S.CAPTION_LENGTH]), S.CollectionLayout(root).metadata(0))
    with Catalog(root) as cat:
        assert (
            cat.query(f"SELECT caption FROM samples WHERE {where} ORDER BY id")
            .table.column(0)
            .to_pylist()
            == LONG_ENOUGH
        )
    with Catalog(root, untrusted=True) as cat:
        assert (
            cat.query(f"SELECT caption FROM samples WHERE {where} ORDER BY id")
            .table.column(0)
            .to_pylist()
            == LONG_ENOUGH
        )
