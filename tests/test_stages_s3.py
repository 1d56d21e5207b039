"""Every curation stage on a collection in a bucket (moto's S3 server on loopback): SQL (trusted,
and sandboxed from local copies), stats, dedup at every level, concepts, uniqueness, the map and
subsets give what they give on the same collection in a local folder, write their outputs into
the bucket, and bad URLs get one-line errors naming them with nothing written."""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from bench.loopback_s3 import _free_port
from collection import schema as S
from collection.parts import read_metadata
from collection.storage import file_signature, read_json, url_to_fs, write_bytes
from collection.takedown import Takedown, add_entries
from curation.catalog import MIRROR_DIR, Catalog, mirror_parts, read_parts
from curation.concept import main as concept_main
from curation.concept_probe import (
    fit_concept,
    load_concept,
    saved_concepts,
    score_collection,
)
from curation.concept_scores import subset_clause as concept_clause
from curation.dedup import dedup, main as dedup_main, read_duplicates
from curation.map import compute_map, read_map, region_clause
from curation.resolve import resolve
from curation.sql import main as sql_main
from curation.stats import stats
from curation.subset import main as subset_main, subset
from curation.uniqueness import compute_uniqueness, read_uniqueness
from curation.vectors import read_table
from indices.build import build
from pipelines.embed import embed
from pipelines.generate import write_sample_dataset

#: report fields that differ between two runs of the same work (where and when, not what)
_RUN_FIELDS = {
    "collection",
    "seconds",
    "finished",
    "path",
    "layout_seconds",
    "place_seconds",
    "task_cpu_seconds",
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory, s3_server) -> tuple[str, str]:
    """A small collection with planted copies, embedded and indexed in a folder, and the same
    files uploaded into a bucket."""
    root = tmp_path_factory.mktemp("stages")
    shards = root / "shards"
    write_sample_dataset(
        shards,
        120,
        shard_size=60,
        seed=5,
        watermark_fraction=0.3,
        near_duplicate_fraction=0.1,
        corrupt_fraction=0.02,
        object_sizes=["small", "medium"],
        noise_texture="coarse",
    )
    local = str(root / "collection")
    embed(str(shards), local, workers=1, scores="watermark")
    build(local, max_index_memory="100M")
    remote = s3_server.make_bucket("stages") + "/collection"
    s3_server.filesystem().put(local, remote.removeprefix("s3://"), recursive=True)
    return local, remote


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private $SIEVE_CACHE, so the sandbox's copies of metadata parts can be looked at."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("SIEVE_CACHE", str(folder))
    return folder


def _copy(s3_server, remote: str, name: str) -> str:
    """A private copy of the bucket's collection, for tests that change or break it."""
    fs = s3_server.filesystem()
    bucket = remote.removeprefix("s3://").split("/")[0]
    target = f"{bucket}/{name}"
    if fs.exists(target):
        fs.rm(target, recursive=True)
    fs.copy(remote.removeprefix("s3://"), target, recursive=True)
    return f"s3://{target}"


def _files(s3_server, url: str) -> set[str]:
    return set(s3_server.filesystem().find(url.removeprefix("s3://")))


def _fs(url: str):
    return url_to_fs(url)[0]


def _what(report):
    """A report less where and when it ran: what two runs of the same work must agree on."""
    if isinstance(report, dict):
        return {k: _what(v) for k, v in report.items() if k not in _RUN_FIELDS}
    return report


QUERIES = [
    f"SELECT * FROM samples ORDER BY {S.KEY}",
    f"SELECT {S.LANGUAGE}, count(*) AS n, avg({S.CLIP_SIMILARITY}) AS s FROM samples "
    "GROUP BY 1 ORDER BY 1",
    f"SELECT {S.ID}, {S.KEY} FROM samples WHERE {S.ID} IS NOT NULL AND {S.WIDTH} >= 48 "
    f"ORDER BY {S.ID}",
]


def test_sql_and_stats_read_a_bucket_as_they_read_a_folder(pair, cache, capsys):
    local, remote = pair
    with Catalog(local) as a, Catalog(remote) as b:
        assert a.columns == b.columns
        for q in QUERIES:
            assert a.query(q).table.equals(b.query(q).table), q
    with Catalog(local) as a, Catalog(remote, untrusted=True) as u:
        for q in QUERIES:
            assert a.query(q).table.equals(u.query(q).table), q
    # the sandbox read local copies, one per part, in one folder under $SIEVE_CACHE
    copies = sorted(p for p in cache.joinpath(MIRROR_DIR).rglob("*") if p.is_file())
    parts = read_parts(remote).files
    assert len(copies) == len(parts) and len({p.parent for p in copies}) == 1
    for copy, url in zip(copies, parts):
        assert copy.name.startswith(os.path.basename(url).removesuffix(".parquet") + ".")
    query = f"SELECT {S.KEY}, {S.CAPTION} FROM samples ORDER BY {S.KEY}"
    sql_main([local, query, "--format", "csv"])
    from_folder = capsys.readouterr().out
    sql_main([remote, query, "--format", "csv"])
    assert capsys.readouterr().out == from_folder
    out = f"{remote.rsplit('/', 1)[0]}/results/keys.csv"
    sql_main([remote, query, "--format", "csv", "--out", out, "--untrusted"])
    capsys.readouterr()
    assert _fs(out).cat_file(out).decode() == from_folder
    a, b = stats(local), stats(remote)
    assert a.pop("collection") == local and b.pop("collection") == remote
    assert a == b and a["histograms"]


def test_the_sandbox_copies_a_part_again_only_when_it_changes(pair, s3_server, cache):
    _, remote = pair
    coll = _copy(s3_server, remote, "rewritten")
    files = read_parts(coll).files
    first = mirror_parts(coll, files)
    assert mirror_parts(coll, files) == first
    part0 = pq.read_table(io.BytesIO(_fs(coll).cat_file(files[0])))
    captions = part0.column(S.CAPTION).to_pylist()
    captions[0] = "a caption rewritten in the bucket"
    part0 = part0.set_column(part0.schema.get_field_index(S.CAPTION), S.CAPTION, [captions]).cast(
        part0.schema
    )
    buf = io.BytesIO()
    pq.write_table(part0, buf)
    write_bytes(files[0], buf.getvalue())
    second = mirror_parts(coll, files)
    assert second[0] != first[0] and second[1:] == first[1:]
    with Catalog(coll, untrusted=True) as u:
        hit = f"SELECT count(*) AS n FROM samples WHERE {S.CAPTION} = '{captions[0]}'"
        assert u.query(hit).table.column(0)[0].as_py() == 1


def test_a_buckets_takedown_list_hides_rows_from_untrusted_sql(pair, s3_server, cache):
    _, remote = pair
    coll = _copy(s3_server, remote, "takedown")
    with Catalog(coll) as c:
        keys = c.query(f"SELECT {S.KEY} FROM samples WHERE {S.ID} IS NOT NULL ORDER BY {S.ID}")
        keys = keys.table.column(0).to_pylist()
    assert Takedown.load(coll).signature is None
    assert add_entries(coll, [(S.KEY, keys[0], "test")]) == 1
    taken = Takedown.load(coll)
    assert keys[0] in taken.keys and taken.signature is not None
    with Catalog(coll, untrusted=True) as u, Catalog(coll) as t:
        where = f"{S.KEY} IN ('{keys[0]}', '{keys[1]}')"
        assert u.count(where) == 1 and t.count(where) == 2


def test_a_rewrite_of_the_same_size_is_a_new_signature_on_a_bucket(s3_bucket):
    url = f"{s3_bucket}/file"
    write_bytes(url, b"abcd")
    first = file_signature(url)
    write_bytes(url, b"abce")
    second = file_signature(url)
    assert first is not None and second is not None and first != second
    assert file_signature(f"{s3_bucket}/nothing") is None


@pytest.mark.parametrize("level", S.DEDUP_LEVELS)
def test_dedup_on_a_bucket_finds_what_it_finds_in_a_folder(pair, s3_server, level):
    local, remote = pair
    run = f"s3-test-{level}"
    a = dedup(local, level, workers=0, run=run)
    b = dedup(remote, level, workers=0, run=run)
    assert _what(a) == _what(b)
    assert read_duplicates(local, run=run).equals(read_duplicates(remote, run=run))
    layout = S.InsightLayout(remote)
    assert read_json(layout.dedup_report(run))["samples"] == a["samples"]
    assert {p.rsplit("/", 1)[-1] for p in _files(s3_server, f"{remote}/dedup/{run}")} == {
        "duplicates.parquet",
        "report.json",
    }
    if level == S.LEVEL_COPIES:
        assert a["removed_by_reason"][S.REASON_COPY] > 0  # the planted copies were found


def test_the_dedup_command_writes_into_the_bucket(pair, capsys):
    local, remote = pair
    dedup_main([remote, "--level", "exact", "--workers", "0", "--run", "s3-command"])
    assert '"run": "s3-command"' in capsys.readouterr().out
    dedup(local, S.LEVEL_EXACT, workers=0, run="s3-command")
    assert read_duplicates(remote, run="s3-command").equals(
        read_duplicates(local, run="s3-command")
    )


def test_concepts_fit_score_and_save_into_a_bucket(pair, capsys):
    local, remote = pair
    meta = read_metadata(local, [S.KEY, "watermark"])
    keys = np.asarray(meta.column(S.KEY).to_pylist(), dtype=object)
    truth = np.asarray(meta.column("watermark").to_pylist(), dtype=bool)
    pos, neg = list(keys[truth][:5]), list(keys[~truth][:5])
    a = fit_concept(local, "marked", pos, neg, seed=1)
    b = fit_concept(remote, "marked", pos, neg, seed=1)
    assert {**a.to_json(), "created": None} == {**b.to_json(), "created": None}
    scores = score_collection(local, a)
    np.testing.assert_array_equal(scores, score_collection(remote, b))
    concept_main([remote, "marked", "--pos", ",".join(pos), "--neg", ",".join(neg), "--seed", "1"])
    assert '"concept": "s3://' in capsys.readouterr().out
    assert saved_concepts(remote) == ["marked"]
    saved = read_table(S.InsightLayout(remote).concept_scores("marked"), "concept scores")
    assert saved.column(S.KEY).to_pylist() == list(keys)
    np.testing.assert_array_equal(saved.column(S.CONCEPT_SCORE).to_numpy(), scores)
    ids = np.arange(len(keys))
    assert load_concept(remote, "marked").threshold == b.threshold
    concept_main([local, "marked", "--pos", ",".join(pos), "--neg", ",".join(neg), "--seed", "1"])
    capsys.readouterr()
    assert np.array_equal(
        concept_clause(local, ids, "marked"), concept_clause(remote, ids, "marked")
    )


def test_uniqueness_and_the_map_on_a_bucket_equal_a_folders(pair, s3_server):
    local, remote = pair
    assert _what(compute_uniqueness(local, k=5)) == _what(compute_uniqueness(remote, k=5))
    assert read_uniqueness(local).equals(read_uniqueness(remote))
    a = compute_map(local, sample=60, clusters=3)
    assert _what(a) == _what(compute_map(remote, sample=60, clusters=3))
    a, b = read_map(local), read_map(remote)
    assert a.equals(b)
    x, y = a.column(S.MAP_X).to_numpy(), a.column(S.MAP_Y).to_numpy()
    rect = (np.quantile(x, 0.1), np.quantile(y, 0.1), np.quantile(x, 0.8), np.quantile(y, 0.9))
    ids = np.arange(a.num_rows)
    assert np.array_equal(
        region_clause(local, ids, rect=rect), region_clause(remote, ids, rect=rect)
    )
    names = {p.rsplit("/", 1)[-1] for p in _files(s3_server, remote)}
    assert {"uniqueness.parquet", "uniqueness.json", "image.parquet", "image.json"} <= names


SPEC = {
    "name": "wide-red",
    "where": f"{S.WIDTH} >= 32",
    "knn": {"text": "a red shape", "k": 60},
    "dedup": "exact",
    "limit": 30,
    "seed": 2,
}


def test_subsets_resolve_dry_run_and_save_on_a_bucket(pair, tiny_clip, tmp_path, capsys):
    local, remote = pair
    a = resolve(local, SPEC, encoder=tiny_clip)
    b = resolve(remote, SPEC, encoder=tiny_clip)
    assert a.keys == b.keys and np.array_equal(a.ids, b.ids) and a.spec_hash == b.spec_hash
    assert [s.count for s in a.steps] == [s.count for s in b.steps] and len(b) == 30
    assert resolve(remote, SPEC, untrusted=True, encoder=tiny_clip).keys == a.keys
    spec = tmp_path / "wide-red.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    assert subset_main([remote, str(spec), "--dry-run", "--save"]) == 0
    out = capsys.readouterr().out
    saved = S.CollectionLayout(remote).subset("wide-red")
    assert f"saved as {saved}" in out and "30 rows" in out
    assert yaml.safe_load(_fs(saved).cat_file(saved)) == SPEC
    keys_out = f"{remote.rsplit('/', 1)[0]}/results/subset-keys.parquet"
    assert subset_main([remote, "wide-red", "--out", keys_out]) == 0
    capsys.readouterr()
    written = read_table(keys_out, "subset keys")
    assert written.column(S.KEY).to_pylist() == a.keys


# ---- bad input -------------------------------------------------------------------------------
STAGES = {
    "sql": lambda url, labels: Catalog(url).close(),
    "sql-untrusted": lambda url, labels: Catalog(url, untrusted=True).close(),
    "stats": lambda url, labels: stats(url),
    "subset": lambda url, labels: subset(url, {"where": "true"}),
    "dedup": lambda url, labels: dedup(url, S.LEVEL_EXACT, workers=0),
    "concept": lambda url, labels: fit_concept(url, "c", labels[:2], labels[2:]),
    "uniqueness": lambda url, labels: compute_uniqueness(url),
    "map": lambda url, labels: compute_map(url, sample=50),
}
#: the stages that read embeddings (the others read metadata only)
VECTOR_STAGES = ("dedup", "concept", "uniqueness", "map")


@pytest.fixture(scope="module")
def labels(pair) -> list[str]:
    """Four embedded keys (concept examples that exist in every copy of the collection)."""
    return read_metadata(pair[0], [S.KEY]).column(0).to_pylist()[:4]


def _one_line_error_naming(stage: str, url: str, named: str, labels: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        STAGES[stage](url, labels)
    message = str(info.value)
    assert named in message and "\n" not in message, message


@pytest.fixture
def unreachable(monkeypatch):
    """The S3 variables pointed at a closed port on 127.0.0.1 (one attempt per request)."""
    import s3fs  # optional (dev extra): the s3_server fixture has skipped without it

    endpoint = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    """No key in the environment and no credentials file; the instance-metadata lookup (a
    non-loopback address) is switched off."""
    import s3fs  # optional (dev extra): the s3_server fixture has skipped without it

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_an_unreachable_endpoint_is_one_line_naming_the_url(
    pair, labels, cache, unreachable, stage
):
    _one_line_error_naming(stage, pair[1], pair[1], labels)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_missing_credentials_are_one_line_naming_the_url(
    pair, labels, cache, no_credentials, stage
):
    _one_line_error_naming(stage, pair[1], pair[1], labels)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_bad_bucket_or_file_urls(labels, s3_bucket, cache, stage):
    url = "s3://no-such-bucket-sieve/collection"
    _one_line_error_naming(stage, url, url, labels)
    write_bytes(f"{s3_bucket}/afile", b"not a collection")
    _one_line_error_naming(stage, f"{s3_bucket}/afile", f"{s3_bucket}/afile", labels)


@pytest.fixture(scope="module")
def broken(pair, s3_server) -> dict[str, tuple[str, str]]:
    """Copies of the bucket's collection whose part 1, listed in _done/, lost a file."""
    _, remote = pair
    out = {}
    for name, path in (
        ("npy", S.CollectionLayout.img_emb),
        ("parquet", S.CollectionLayout.metadata),
    ):
        url = _copy(s3_server, remote, f"no-{name}")
        gone = path(S.CollectionLayout(url), 1)
        s3_server.filesystem().rm(gone.removeprefix("s3://"))
        out[name] = (url, gone.rsplit("/", 1)[-1])
    return out


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_done_part_missing_its_files_fails_whole_naming_them(
    broken, labels, s3_server, cache, stage
):
    cases = [broken["parquet"]] + ([broken["npy"]] if stage in VECTOR_STAGES else [])
    for url, named in cases:
        before = _files(s3_server, url)
        _one_line_error_naming(stage, url, named, labels)
        assert _files(s3_server, url) == before  # nothing written, half or whole


def test_commands_say_a_bad_url_in_one_line(pair, s3_bucket, capsys):
    url = f"{s3_bucket}/nothing-here"
    with pytest.raises(SystemExit) as info:
        sql_main([url, "SELECT 1"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert url in err and len(err.splitlines()) == 1
    assert subset_main([url, "wide-red"]) == 2
    err = capsys.readouterr().err.strip()
    assert url in err and len(err.splitlines()) == 1
