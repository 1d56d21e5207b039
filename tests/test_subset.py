"""Subset specs: parsing, clause semantics against brute force, determinism, the spec hash,
takedown, the dry run, and one-line errors for bad specs."""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

import curation.context as context_module
from bench.synthetic import clustered_vectors, write_collection, write_takedown
from collection import schema as S
from collection.embeddings import EmbeddingStore
from curation.catalog import Catalog
from curation.filters import render
from curation.resolve import parse_spec, resolve, spec_hash
from curation.spec import SpecError
from curation.vectors import read_keys

DIM = 16
N = 400  # per part, two parts


class StubClip:
    """A text/image 'encoder' with fixed random directions per input: fast and exact to check."""

    dim = DIM

    @staticmethod
    def _vec(text: str) -> np.ndarray:
        v = np.random.default_rng(zlib.crc32(text.encode())).standard_normal(DIM).astype(np.float32)
        return v / np.linalg.norm(v)

    def encode_texts(self, texts):
        return np.stack([self._vec(t) for t in texts])

    def encode_images(self, images):
        return np.stack([self._vec(str(img.size)) for img in images])


@pytest.fixture(scope="module")
def coll(tmp_path_factory):
    from indices.build import build, build_one

    root = str(tmp_path_factory.mktemp("subset") / "coll")
    parts = [clustered_vectors(N, DIM, 12, seed=i) for i in range(2)]
    text = [clustered_vectors(N, DIM, 12, seed=10 + i) for i in range(2)]
    sims = [round(0.2 + 0.01 * (i % 15), 2) for i in range(2 * N)]
    widths = [32 + 16 * (i % 4) for i in range(2 * N)]
    write_collection(
        root, parts, text, columns={S.CLIP_SIMILARITY: sims, S.WIDTH: widths}, failed_per_part=4
    )
    build(root, max_index_memory="100M", modality="image")  # Flat: exact distances
    build_one(
        root, "text", index_key="IVF8,PQ8x4"
    )  # compressed codes: range search needs the re-rank
    return root


def _all(root: str, modality: str = S.MODALITY_IMAGE) -> np.ndarray:
    store = EmbeddingStore.open(root, modality)
    return store.gather(np.arange(store.count))


def _brute_top(vectors: np.ndarray, q: np.ndarray, ids: np.ndarray, k: int) -> list[int]:
    sims = vectors[ids] @ q
    return sorted(ids[np.lexsort((ids, -sims))[:k]].tolist())


def test_same_spec_gives_same_keys_in_same_order_and_hash(coll):
    spec = {"where": "width >= 48", "knn": {"key": "000000005", "k": 40}, "limit": 25, "seed": 3}
    a, b = resolve(coll, spec), resolve(coll, dict(spec))
    assert a.keys == b.keys and np.array_equal(a.ids, b.ids) and a.spec_hash == b.spec_hash
    assert len(a) == 25 and list(a.ids) == sorted(a.ids)
    other_seed = resolve(coll, {**spec, "seed": 4})
    assert other_seed.keys != a.keys and other_seed.spec_hash != a.spec_hash


def test_untrusted_specs_run_their_sql_sandboxed_with_the_same_result(coll):
    spec = {
        "where": "width >= 48",
        "filters": {"preset": "laion", "min_similarity": 0.25},
        "limit": 30,
    }
    assert resolve(coll, spec, untrusted=True).keys == resolve(coll, spec).keys


def test_untrusted_where_is_asked_in_id_windows_and_loses_no_row(coll, monkeypatch):
    """A large collection's sandboxed where runs one query per id window (the sandbox caps each
    answer's bytes); the windows together give exactly the trusted answer."""
    monkeypatch.setattr(context_module, "WHERE_WINDOW", 7)
    spec = {"where": ["width >= 40 OR caption LIKE '%red%'"]}
    assert resolve(coll, spec, untrusted=True).keys == resolve(coll, spec).keys


def test_a_keys_clause_keeps_exactly_its_keys_and_names_an_unknown_one(coll):
    keys = read_keys(coll)
    chosen = [str(keys[i]) for i in (40, 5, 17)]
    got = resolve(coll, {"keys": chosen}).keys
    assert sorted(got) == sorted(chosen)
    assert (
        resolve(coll, {"keys": chosen[::-1]}).spec_hash == resolve(coll, {"keys": chosen}).spec_hash
    )
    with pytest.raises(SpecError, match="nope"):
        resolve(coll, {"keys": [chosen[0], "nope"]})
    with pytest.raises(SpecError, match="keys: give a list"):
        resolve(coll, {"keys": "just-one"})


def test_spec_hash_covers_clauses_and_collection_not_name(coll, tmp_path):
    base = {"name": "a", "description": "x", "where": "width >= 48"}
    h = spec_hash(parse_spec(base, coll), coll)
    assert spec_hash(parse_spec({**base, "name": "b", "description": "y"}, coll), coll) == h
    assert spec_hash(parse_spec({**base, "where": "width >= 64"}, coll), coll) != h
    assert spec_hash(parse_spec({**base, "limit": 10}, coll), coll) != h
    twin = str(tmp_path / "twin")
    write_collection(twin, [clustered_vectors(10, DIM, 2)], [clustered_vectors(10, DIM, 2, seed=1)])
    assert spec_hash(parse_spec(base, twin), twin) != h


def test_where_and_filters_count_what_sql_selects(coll):
    widths = np.array([32 + 16 * (i % 4) for i in range(2 * N)])
    res = resolve(coll, {"where": ["width >= 48", "width < 80"]})
    assert res.ids.tolist() == np.nonzero((widths >= 48) & (widths < 80))[0].tolist()
    assert [s.count for s in res.steps] == [2 * N, int((widths >= 48).sum()), len(res)]
    res = resolve(
        coll, {"where": "width >= 48", "filters": {"preset": "laion", "min_similarity": 0.3}}
    )
    with Catalog(coll) as cat:
        passing = cat.query(
            f"SELECT id FROM samples WHERE id IS NOT NULL AND {render('laion', min_similarity=0.3)}"
        )
    expected = sorted(
        set(passing.table["id"].to_pylist()) & set(np.nonzero(widths >= 48)[0].tolist())
    )
    assert res.ids.tolist() == expected and 0 < len(expected) < int((widths >= 48).sum())


def test_knn_k_is_the_exact_top_k_among_kept_rows(coll):
    vectors = _all(coll)
    q = vectors[7]
    res = resolve(coll, {"where": "width = 64", "knn": {"embedding": q.tolist(), "k": 30}})
    kept = np.nonzero(np.array([32 + 16 * (i % 4) for i in range(2 * N)]) == 64)[0]
    assert res.ids.tolist() == _brute_top(vectors, q / np.linalg.norm(q), kept, 30)


@pytest.mark.parametrize("modality", [S.MODALITY_IMAGE, S.MODALITY_TEXT])
def test_min_similarity_uses_range_search_and_keeps_only_exact_matches(coll, modality, monkeypatch):
    calls = []
    vectors = _all(coll, modality)
    q = vectors[3] / np.linalg.norm(vectors[3])
    exact = vectors @ q
    threshold = float(np.sort(exact)[-60])  # about 60 rows
    from curation import knn

    real = knn.range_within
    monkeypatch.setattr(knn, "range_within", lambda *a: calls.append(a[-1]) or real(*a))
    res = resolve(
        coll, {"knn": {"embedding": q.tolist(), "min_similarity": threshold, "modality": modality}}
    )
    truth = set(np.nonzero(exact >= threshold)[0].tolist())
    got = set(res.ids.tolist())
    assert calls == [threshold]
    assert got <= truth  # the exact re-rank drops every approximate false match
    assert len(got) >= (len(truth) if modality == S.MODALITY_IMAGE else 0.9 * len(truth))


def test_weighted_and_negative_prompts_query_their_combined_vector(coll):
    stub = StubClip()
    vectors = _all(coll)
    res = resolve(coll, {"knn": {"text": "a red star:1|blurry:-0.5", "k": 20}}, encoder=stub)
    q = stub._vec("a red star") - 0.5 * stub._vec("blurry")
    assert res.ids.tolist() == _brute_top(vectors, q / np.linalg.norm(q), np.arange(2 * N), 20)
    assert res.steps[-1].label.startswith("knn[0] text 'a red star'")


def test_exclude_removes_the_matches_and_keys_query_their_own_embedding(coll):
    vectors = _all(coll)
    near = set(_brute_top(vectors, vectors[12] / np.linalg.norm(vectors[12]), np.arange(2 * N), 15))
    res = resolve(coll, {"knn": {"key": "000000012", "k": 15, "exclude": True}})
    assert set(res.ids.tolist()) == set(range(2 * N)) - near and 12 in near


def test_taken_down_rows_never_resolve(coll, tmp_path):
    import shutil

    root = str(tmp_path / "td")
    shutil.copytree(coll, root)
    write_takedown(root, keys=["000000003"], sha256=[f"{1:08x}{5:056x}"])  # part 1 row 5
    res = resolve(root, {"where": "true"})
    assert "000000003" not in res.keys and "001000005" not in res.keys
    assert len(res) == 2 * N - 2 and res.blocked == 2
    with pytest.raises(SpecError, match="'000000003' is not an embedded, visible row"):
        resolve(root, {"knn": {"key": "000000003", "k": 3}})


@pytest.mark.parametrize(
    "spec, named",
    [
        ("name: x\nwhere: [unclosed\n", "malformed YAML at line"),
        ("wher: width > 3\n", "unknown field 'wher'"),
        ("where: no_such_column > 3\n", "no_such_column"),
        (
            "knn: {text: a, k: 3, min_similarity: 0.2}\n",
            "knn[0]: give exactly one of k or min_similarity",
        ),
        ("knn: {image: missing.jpg, k: 3}\n", "missing.jpg"),
        ("knn: {text: 'blurry:-1', k: 3}\n", "positive weight"),
        ("filters: {preset: laion, no_such_filter: 1}\n", "filters: "),
        ("limit: 0\n", "limit: must be a positive integer"),
        ("- a list\n", "a spec is a YAML mapping"),
    ],
)
def test_bad_specs_are_one_line_errors_naming_the_field(coll, tmp_path, spec, named):
    path = tmp_path / "bad.yaml"
    path.write_text(spec)
    with pytest.raises(SpecError) as err:
        resolve(coll, str(path), encoder=StubClip())
    assert named in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_collection_or_index_is_named(coll, tmp_path):
    with pytest.raises(SpecError, match="no_such_collection"):
        resolve(str(tmp_path / "no_such_collection"), {"where": "true"})
    bare = str(tmp_path / "bare")
    write_collection(bare, [clustered_vectors(10, DIM, 2)], [clustered_vectors(10, DIM, 2, seed=1)])
    with pytest.raises(
        SpecError, match="has no image index; build it with `python -m indices.build"
    ):
        resolve(bare, {"knn": {"key": "000000001", "k": 3}})


def test_dry_run_prints_each_clause_count_and_captions(coll, capsys):
    from collection.storage import write_bytes
    from curation.subset import main

    write_bytes(
        S.CollectionLayout(coll).subset("wide"), b"name: wide\nwhere: width >= 64\nlimit: 50\n"
    )
    assert main([coll, "wide", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "subset wide" in out and "where width >= 64" in out and "e.g. caption" in out
    counts = [
        int(line.split()[-1].replace(",", ""))
        for line in out.splitlines()
        if line.startswith("  ") and "e.g." not in line
    ]
    assert counts == [2 * N, N, 50]
    assert main([coll, "nothing-by-this-name"]) == 2
    assert "no subset named 'nothing-by-this-name'" in capsys.readouterr().err


def test_save_subset_writes_a_checked_spec_by_name(coll, tmp_path, capsys):
    from curation.subset import main, save_subset

    layout = S.CollectionLayout(coll)
    path = save_subset(coll, {"name": "saved-wide", "where": "width >= 64", "limit": 7})
    assert path == layout.subset("saved-wide")
    assert len(resolve(coll, "saved-wide")) == 7
    with pytest.raises(SpecError, match="exists already"):
        save_subset(coll, {"name": "saved-wide", "limit": 3}, overwrite=False)
    with pytest.raises(SpecError, match="must be a file name"):
        save_subset(coll, {"name": "../escape", "limit": 3})
    with pytest.raises(SpecError, match="limit"):
        save_subset(coll, {"name": "bad-limit", "limit": 0})
    assert (
        not os.path.exists(layout.subset("bad-limit"))
        and not (tmp_path.parent / "escape.yaml").exists()
    )
    spec = tmp_path / "from-file.yaml"
    spec.write_text("where: width >= 64\n")
    assert main([coll, str(spec), "--dry-run", "--save"]) == 0
    assert f"saved as {layout.subset('from-file')}" in capsys.readouterr().out
    assert resolve(coll, "from-file").keys == resolve(coll, str(spec)).keys
