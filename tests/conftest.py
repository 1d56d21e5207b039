"""Shared fixtures: the bundled tiny CLIP, trained once into the shared cache
and reused across sessions.

The tests use the same cache as the demo (`$SIEVE_CACHE`, else ~/.cache/sieve): a cached model
is current only when it was trained with today's recipe (models.cache), so sharing is safe.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_clip():
    """`load_clip("sieve-tiny")` on CPU
    (trained first, in a child process, if the cache lacks it)."""
    from models.clip import load_clip

    return load_clip("sieve-tiny", device="cpu")


@pytest.fixture(scope="session")
def demo_collection(tmp_path_factory) -> dict[str, str]:
    """What `make demo` builds, smaller: 300 generated samples in one shard, embedded with the
    watermark and toxicity scores, indexed. Shared by the README and web UI tests; tests that
    write into a collection copy it first."""
    from indices.build import build
    from pipelines.embed import embed
    from pipelines.generate import write_sample_dataset

    root = tmp_path_factory.mktemp("demo")
    shards, collection = root / "shards", root / "collection"
    write_sample_dataset(shards, 300, shard_size=300, corrupt_fraction=0.02)
    embed(str(shards), str(collection), workers=1, scores="watermark,toxicity")
    build(str(collection), max_index_memory="100M")
    return {"demo/shards": str(shards), "demo/collection": str(collection)}


@pytest.fixture(scope="session")
def insight_collection(tmp_path_factory) -> dict:
    """A small embedded collection with planted copies and an image index, for the duplicates,
    concepts, uniqueness and map tests: 300 generated samples (small and medium objects, coarse
    noisy backgrounds, a fifth watermarked, a tenth planted copies), embedded with the watermark
    score. Tests that write into it use their own run / concept names."""
    from indices.build import build
    from pipelines.embed import embed
    from pipelines.generate import write_sample_dataset

    root = tmp_path_factory.mktemp("insight")
    shards, collection = root / "shards", root / "collection"
    write_sample_dataset(
        shards,
        300,
        shard_size=150,
        seed=11,
        watermark_fraction=0.2,
        near_duplicate_fraction=0.1,
        object_sizes=["small", "medium"],
        noise_texture="coarse",
    )
    embed(str(shards), str(collection), workers=1, scores="watermark")
    build(str(collection), max_index_memory="100M", modality="image")
    return {"shards": str(shards), "collection": str(collection)}


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 for the session, with the AWS variables pointing at it.
    Skipped with the reason where moto or s3fs is missing; under CI that is a failure."""
    import os

    from bench.loopback_s3 import available, loopback_s3

    reason = available()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    with loopback_s3() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server, request) -> str:
    """A fresh bucket for one test: `s3://NAME`."""
    import re

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-")
    return s3_server.make_bucket(f"t-{name}")
