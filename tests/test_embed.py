"""The Dask embedding job: collection contract, failures, resume, and real multi-process
clusters."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from collection import schema as S
from models.int8 import int8_supported
from pipelines import embed_worker
from pipelines.embed import EmbedJobError, embed
from tests.test_shards import sample_members, tricky_members, write_tar

ROOT = Path(__file__).resolve().parent.parent
N_GOOD = 12  # good samples per shard
N_SHARDS = 3
BATCH = 5  # small batches so every part spans several of them


@pytest.fixture(scope="module", autouse=True)
def _model(tiny_clip):
    """sieve-tiny trained and SIEVE_CACHE set before any worker process starts."""
    return tiny_clip


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Three tar shards of generated pairs, each with one member of every failure kind."""
    root = tmp_path_factory.mktemp("shards")
    for i in range(N_SHARDS):
        tricky, _ = tricky_members(f"t{i}")
        good = sample_members(N_GOOD, start=N_GOOD * i)
        write_tar(root / S.shard_name(i), good[:9] + tricky + good[9:])
    return root


@pytest.fixture(scope="module")
def client():
    """An in-process cluster: tests can monkeypatch the worker code it runs."""
    from collection.cluster import open_cluster

    with open_cluster(workers=1, threads_per_worker=1, processes=False) as cluster:
        yield cluster.client


@pytest.fixture(scope="module")
def clean(shards, client, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("clean") / "collection"
    return out, embed(str(shards), str(out), batch_size=BATCH, client=client)


def load_collection(out: Path) -> tuple[pd.DataFrame, list[np.ndarray], list[np.ndarray]]:
    layout = S.CollectionLayout(str(out))
    n = len(list((out / S.DONE_DIR).glob("*.json")))
    meta = pd.concat([pd.read_parquet(layout.metadata(i)) for i in range(n)], ignore_index=True)
    return (
        meta,
        [np.load(layout.img_emb(i)) for i in range(n)],
        [np.load(layout.text_emb(i)) for i in range(n)],
    )


def test_collection_rows_statuses_and_aligned_embeddings(clean):
    out, summary = clean
    meta, img, txt = load_collection(out)
    _, expected = tricky_members("t0")
    n_bad = len(expected)
    assert summary["count"] == len(meta) == N_SHARDS * (N_GOOD + n_bad)
    assert summary["ok"] == N_SHARDS * N_GOOD and summary["parts"] == N_SHARDS
    assert meta[S.KEY].is_unique
    assert list(meta.columns[: len(S.METADATA_COLUMNS)]) == list(S.METADATA_COLUMNS)
    for i in range(N_SHARDS):
        part = meta[meta[S.PART] == i]
        assert list(part[S.ROW]) == list(range(len(part)))
        assert part[S.SOURCE_SHARD].str.endswith(S.shard_name(i)).all()
        got = dict(zip(part[S.KEY], part[S.STATUS]))
        assert {k.replace("t0", f"t{i}"): v for k, v in expected.items()} == {
            k: v for k, v in got.items() if k.startswith("t")
        }
        ok = part[part[S.STATUS] == S.STATUS_OK]
        assert len(ok) == N_GOOD == len(img[i]) == len(txt[i])
        assert list(ok[S.EMB_ROW]) == list(range(N_GOOD))
        assert part.loc[part[S.STATUS] != S.STATUS_OK, S.EMB_ROW].isna().all()
        assert part.loc[part[S.STATUS] != S.STATUS_OK, S.ERROR].notna().all()
        assert img[i].dtype == np.float16 and txt[i].dtype == np.float16
        np.testing.assert_allclose(np.linalg.norm(img[i].astype(np.float32), axis=1), 1, atol=5e-3)
        sims = np.einsum("ij,ij->i", img[i].astype(np.float32), txt[i].astype(np.float32))
        np.testing.assert_allclose(ok[S.CLIP_SIMILARITY].to_numpy(), sims, atol=5e-3)
        assert ok[S.WIDTH].eq(32).all() and ok[S.PHASH].str.len().eq(16).all()
    # CLD3 at embed time: the generated captions are English (CLD3 is unsure of some short ones,
    # `und`, as it was of LAION's); rows without a caption have no language
    has_caption = meta[S.CAPTION].fillna("").str.strip().ne("")
    assert meta.loc[meta[S.STATUS] == S.STATUS_OK, S.LANGUAGE].value_counts().index[0] == "en"
    assert meta.loc[has_caption, S.LANGUAGE].notna().all()
    assert meta.loc[has_caption, S.LANGUAGE_SCORE].between(0, 1).all()
    assert meta.loc[~has_caption, S.LANGUAGE].isna().all()
    # source json fields are kept; colliding names get the src_ prefix
    assert set(meta.loc[meta[S.STATUS] == S.STATUS_OK, "shape"]) and "src_status" in meta
    # the model understands the pairs: matching captions score above shuffled ones
    all_img = np.concatenate(img).astype(np.float32)
    all_txt = np.concatenate(txt).astype(np.float32)
    matched = np.einsum("ij,ij->i", all_img, all_txt).mean()
    shuffled = np.einsum("ij,ij->i", all_img, np.roll(all_txt, 7, axis=0)).mean()
    assert matched > shuffled + 0.05
    doc = json.loads((out / S.COLLECTION_JSON).read_text())
    assert doc["clip_model"] == "sieve-tiny" and doc["emb_dim"] == img[0].shape[1]
    assert doc["schema_version"] == S.SCHEMA_VERSION
    assert not list(out.rglob("*.tmp*"))  # temporary names are <file>.tmp<pid> (collection.storage)


def test_each_worker_loads_the_model_once(clean):
    out, _ = clean
    stats = [json.loads(p.read_text()) for p in (out / S.DONE_DIR).glob("*.json")]
    hits = sorted(s["model_cache_hit"] for s in stats)
    # one worker in this cluster: at most one part paid for loading (none if an earlier test did)
    assert hits.count(False) <= 1 and len(hits) == N_SHARDS


@pytest.mark.skipif(not int8_supported(), reason="torch has no x86/fbgemm int8 engine")
def test_int8_job_gives_the_fp32_collection_within_quantization_error(
    shards, client, clean, tmp_path
):
    """sieve-tiny's ResNet image tower stays fp32 under int8; its text blocks are quantized."""
    out = tmp_path / "int8"
    embed(str(shards), str(out), batch_size=BATCH, client=client, precision="int8")
    meta, img, txt = load_collection(out)
    ref_meta, ref_img, ref_txt = load_collection(clean[0])
    assert meta[[S.KEY, S.STATUS]].equals(ref_meta[[S.KEY, S.STATUS]])
    for i in range(N_SHARDS):
        np.testing.assert_array_equal(img[i], ref_img[i])
        cos = np.einsum("ij,ij->i", txt[i].astype(np.float32), ref_txt[i].astype(np.float32))
        assert cos.min() > 0.999 and not np.array_equal(txt[i], ref_txt[i])
    stats = [json.loads(p.read_text()) for p in (out / S.DONE_DIR).glob("*.json")]
    assert [s["precision"] for s in stats] == ["int8"] * N_SHARDS


def test_killed_part_way_then_rerun_matches_clean_run(shards, client, clean, tmp_path, monkeypatch):
    out = tmp_path / "collection"
    real_write = embed_worker.write_part

    def dying_write(output, n, rows, img_emb, text_emb, stats):
        if n == 1:  # die mid-commit: embeddings written, metadata and marker not
            from collection.storage import write_bytes
            from pipelines.embed_writer import npy_bytes

            write_bytes(S.CollectionLayout(output).img_emb(n), npy_bytes(img_emb))
            raise RuntimeError("worker killed")
        real_write(output, n, rows, img_emb, text_emb, stats)

    monkeypatch.setattr(embed_worker, "write_part", dying_write)
    with pytest.raises(EmbedJobError, match=S.shard_name(1)) as err:
        embed(str(shards), str(out), batch_size=BATCH, client=client)
    assert err.value.summary["parts"] == N_SHARDS - 1
    assert not (out / S.DONE_DIR / "1.json").exists()
    first = {i: (out / S.DONE_DIR / f"{i}.json").read_text() for i in (0, 2)}
    monkeypatch.setattr(embed_worker, "write_part", real_write)
    summary = embed(str(shards), str(out), batch_size=BATCH, client=client)
    assert summary["processed_now"] == 1
    assert all((out / S.DONE_DIR / f"{i}.json").read_text() == first[i] for i in (0, 2))
    meta, img, _ = load_collection(out)
    clean_meta, clean_img, _ = load_collection(clean[0])
    assert meta[S.KEY].is_unique
    assert set(meta[S.KEY]) == set(clean_meta[S.KEY])
    pd.testing.assert_frame_equal(
        meta.drop(columns=[S.CLIP_SIMILARITY]), clean_meta.drop(columns=[S.CLIP_SIMILARITY])
    )
    np.testing.assert_allclose(
        np.concatenate(img).astype(np.float32),
        np.concatenate(clean_img).astype(np.float32),
        atol=2e-3,
    )


def test_unopenable_shard_is_named_and_the_rest_committed(shards, client, tmp_path):
    src = tmp_path / "shards"
    shutil.copytree(shards, src)
    (src / S.shard_name(N_SHARDS)).write_bytes(b"this is not a tar")
    out = tmp_path / "collection"
    with pytest.raises(EmbedJobError) as err:
        embed(str(src), str(out), batch_size=BATCH, client=client)
    assert list(err.value.failed) == [str(src / S.shard_name(N_SHARDS))]
    assert "ShardOpenError" in next(iter(err.value.failed.values()))
    assert sorted(p.name for p in (out / S.DONE_DIR).iterdir()) == [
        f"{i}.json" for i in range(N_SHARDS)
    ]
    assert json.loads((out / S.COLLECTION_JSON).read_text())["failed_shards"]


def test_changed_shard_is_redone_and_overwrite_redoes_all(shards, client, tmp_path):
    src = tmp_path / "shards"
    shutil.copytree(shards, src)
    out = tmp_path / "collection"
    embed(str(src), str(out), batch_size=BATCH, client=client)
    write_tar(src / S.shard_name(2), sample_members(4, start=500))
    summary = embed(str(src), str(out), batch_size=BATCH, client=client)
    assert summary["processed_now"] == 1
    assert pd.read_parquet(S.CollectionLayout(str(out)).metadata(2))[S.KEY].tolist() == [
        f"s{i:05d}" for i in range(500, 504)
    ]
    assert embed(str(src), str(out), batch_size=BATCH, client=client)["processed_now"] == 0
    assert (
        embed(str(src), str(out), batch_size=BATCH, client=client, overwrite=True)["processed_now"]
        == N_SHARDS
    )


def test_fsspec_memory_input_and_output(client):
    import fsspec

    fs = fsspec.filesystem("memory")
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in sample_members(3):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    fs.pipe("/embed-test/in/00000.tar", buf.getvalue())
    try:
        summary = embed(
            "memory://embed-test/in/{00000..00000}.tar",
            "memory://embed-test/out",
            batch_size=BATCH,
            client=client,
        )
        assert summary["ok"] == 3
        with fs.open("/embed-test/out/img_emb/img_emb_0.npy", "rb") as fh:
            assert np.load(fh).shape[0] == 3
        assert fs.exists("/embed-test/out/_done/0.json")
    finally:
        fs.rm("/embed-test", recursive=True)


def _stand_in_scorers() -> types.SimpleNamespace:
    """A fake pipelines.scorers with the agreed interface, for the plumbing test."""
    mod = types.SimpleNamespace()

    class Fake:
        def __init__(self, name, column, kind):
            self.name, self.column, self.kind = name, column, kind

        def score(self, items):
            if self.kind == "image":
                return np.array([im.size[0] / 100 for im in items], dtype=np.float32)
            return np.array([len(t) / 1000 for t in items], dtype=np.float32)

    table = {
        "nsfw": (S.PUNSAFE, "image"),
        "watermark": (S.PWATERMARK, "image"),
        "toxicity": (S.PTOXIC, "text"),
    }
    mod.SCORER_NAMES = tuple(table)
    mod.load_scorer = lambda name, **opts: Fake(name, *table[name])
    return mod


@pytest.fixture
def stand_in_scorers(monkeypatch):
    """The worker's `load_scorer` (imported from pipelines.scorers) replaced; the in-process
    cluster sees it."""
    from pipelines.scorers import SCORER_NAMES

    fake = _stand_in_scorers()
    assert (
        fake.SCORER_NAMES == SCORER_NAMES
    )  # pipelines.embed checks --scores against the real names
    monkeypatch.setattr(embed_worker, "load_scorer", fake.load_scorer)
    embed_worker.clear_cache()
    yield
    embed_worker.clear_cache()  # drop the fakes from the per-process model cache


def test_scores_fill_their_columns_for_ok_rows(shards, client, tmp_path, stand_in_scorers):
    out = tmp_path / "collection"
    embed(
        str(shards / S.shard_name(0)),
        str(out),
        batch_size=BATCH,
        client=client,
        scores="nsfw,toxicity",
    )
    meta = pd.read_parquet(S.CollectionLayout(str(out)).metadata(0))
    ok = meta[S.STATUS] == S.STATUS_OK
    np.testing.assert_allclose(meta.loc[ok, S.PUNSAFE], 0.32, rtol=1e-6)
    np.testing.assert_allclose(
        meta.loc[ok, S.PTOXIC], meta.loc[ok, S.CAPTION].str.len() / 1000, rtol=1e-5
    )
    assert meta.loc[~ok, S.PUNSAFE].isna().all() and meta[S.PWATERMARK].isna().all()
    with pytest.raises(ValueError, match="unknown score"):
        embed(str(shards), str(out), client=client, scores="nsfw,beauty")


def test_real_scorers(shards, client, tmp_path):
    pytest.importorskip("pipelines.scorers")
    out = tmp_path / "collection"
    embed(
        str(shards / S.shard_name(0)),
        str(out),
        batch_size=BATCH,
        client=client,
        scores="nsfw,watermark,toxicity",
    )
    meta = pd.read_parquet(S.CollectionLayout(str(out)).metadata(0))
    ok = meta[meta[S.STATUS] == S.STATUS_OK]
    for col in (S.PUNSAFE, S.PWATERMARK, S.PTOXIC):
        assert ok[col].between(0, 1).all(), col


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_workers(address: str, n: int, timeout: float = 90) -> None:
    from distributed import Client

    with Client(address, timeout=timeout) as c:
        c.wait_for_workers(n, timeout=timeout)


def test_real_scheduler_and_two_worker_processes_match_local_cluster(shards, tmp_path):
    """`--scheduler tcp://...` against processes started here gives the LocalCluster's output."""
    local = tmp_path / "local"
    embed(str(shards), str(local), batch_size=BATCH, workers=1, threads_per_worker=1)
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    bin_dir = Path(sys.executable).parent
    procs = [
        subprocess.Popen(
            [
                str(bin_dir / "dask"),
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--dashboard-address",
                ":0",
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        time.sleep(1)
        for _ in range(2):
            procs.append(
                subprocess.Popen(
                    [
                        str(bin_dir / "dask"),
                        "worker",
                        address,
                        "--nthreads",
                        "1",
                        "--nworkers",
                        "1",
                        "--host",
                        "127.0.0.1",
                        "--no-dashboard",
                    ],
                    env=env,
                    cwd=ROOT,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        _wait_for_workers(address, 2)
        remote = tmp_path / "remote"
        embed(str(shards), str(remote), batch_size=BATCH, scheduler=address, threads_per_worker=1)
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
    meta_l, img_l, txt_l = load_collection(local)
    meta_r, img_r, txt_r = load_collection(remote)
    pd.testing.assert_frame_equal(
        meta_l.drop(columns=[S.CLIP_SIMILARITY]), meta_r.drop(columns=[S.CLIP_SIMILARITY])
    )
    np.testing.assert_allclose(meta_l[S.CLIP_SIMILARITY], meta_r[S.CLIP_SIMILARITY], atol=2e-3)
    for a, b in zip(img_l + txt_l, img_r + txt_r):
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=2e-3)
    workers = {json.loads(p.read_text())["worker"] for p in (remote / S.DONE_DIR).glob("*.json")}
    assert len(workers) == 2  # both worker processes took shards


@pytest.mark.parametrize("broken", [False, True])
def test_reading_ahead_inline_and_by_a_decode_pool_give_the_same_part(
    shards, tmp_path, monkeypatch, broken
):
    """The read paths (reader thread, inline, reader thread with 3 decode threads) commit
    identical parts, in shard order, and a reader error surfaces from each."""
    from collection import shards as readers
    from collection.shards import list_shards

    shard = list_shards(str(shards))[1]
    if broken:
        real = readers.read_shard

        def failing(s):
            for i, raw in enumerate(real(s)):
                if i == 7:
                    raise OSError("disk went away")
                yield raw

        monkeypatch.setattr(embed_worker, "read_shard", failing)
    parts = {}
    for name, ahead, decoders in (
        ("thread", True, None),
        ("inline", False, None),
        ("pool", True, 3),
    ):
        monkeypatch.setattr(embed_worker, "read_ahead", lambda clip, threads, a=ahead: a)
        out = tmp_path / name
        config = embed_worker.EmbedConfig(batch_size=BATCH, decode_threads=decoders)
        if broken:
            with pytest.raises(OSError, match="disk went away"):
                embed_worker.process_shard(shard, str(out), config)
            continue
        stats = embed_worker.process_shard(shard, str(out), config)
        assert stats["decode_threads"] == (decoders or 1)  # a CPU worker decodes in its reader
        parts[name] = _part(out, shard.index)
    if not broken:
        meta, img, txt = parts["thread"]
        assert len(img) == N_GOOD
        for other in ("inline", "pool"):
            meta_b, img_b, txt_b = parts[other]
            pd.testing.assert_frame_equal(meta, meta_b)
            assert np.array_equal(img, img_b) and np.array_equal(txt, txt_b)


def _part(out: Path, n: int):
    layout = S.CollectionLayout(str(out))
    return (
        pd.read_parquet(layout.metadata(n)),
        np.load(layout.img_emb(n)),
        np.load(layout.text_emb(n)),
    )


def test_embed_leaves_the_callers_environment_as_it_was(shards, tmp_path, monkeypatch):
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    embed(str(shards), str(tmp_path / "c"), workers=1, threads_per_worker=1, batch_size=BATCH)
    assert "MALLOC_ARENA_MAX" not in os.environ


def test_cli_exits_nonzero_naming_the_unopenable_shard(shards, tmp_path):
    src = tmp_path / "shards"
    src.mkdir()
    shutil.copy(shards / S.shard_name(0), src / S.shard_name(0))
    (src / S.shard_name(1)).write_bytes(b"\0" * 10)
    out = tmp_path / "collection"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.embed",
            str(src),
            str(out),
            "--workers",
            "1",
            "--threads-per-worker",
            "1",
            "--batch-size",
            str(BATCH),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"FAILED {src / S.shard_name(1)}" in proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["parts"] == 1 and summary["ok"] == N_GOOD
    assert (out / S.DONE_DIR / "0.json").exists() and not (out / S.DONE_DIR / "1.json").exists()
