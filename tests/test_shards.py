"""Readers: the three img2dataset formats, fsspec URLs, brace patterns, and broken input."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.security_web import bomb_png
from collection import schema as S
from collection.shards import (
    FILES,
    PARQUET,
    WEBDATASET,
    ShardOpenError,
    fingerprint,
    list_shards,
    read_shard,
)
from models.scenes import iter_samples
from pipelines.decode import decode_sample


# ---- builders shared with tests/test_embed.py -------------------------------------------
def jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            _member(tar, name, data)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def sample_members(n: int, start: int = 0, prefix: str = "s") -> list[tuple[str, bytes]]:
    """Good generated samples as webdataset members ({key}.jpg/.txt/.json)."""
    out = []
    for i, s in enumerate(iter_samples(n, size=32, start=start)):
        key = f"{prefix}{start + i:05d}"
        meta = {
            "url": f"http://x.invalid/{key}.jpg",
            "status": "success",
            "shape": s.attrs["shape"],
        }
        out += [
            (f"{key}.jpg", jpeg_bytes(s.image)),
            (f"{key}.txt", s.caption.encode()),
            (f"{key}.json", json.dumps(meta).encode()),
        ]
    return out


def tricky_members(prefix: str = "t") -> tuple[list[tuple[str, bytes]], dict[str, str]]:
    """One sample of each failure kind, and the status each must get."""
    good = jpeg_bytes(Image.new("RGB", (24, 24), (200, 30, 30)))
    members = [
        (f"{prefix}_trunc.jpg", good[: len(good) // 2]),
        (f"{prefix}_trunc.txt", b"a red square"),
        (f"{prefix}_garbage.jpg", b"not an image at all" * 10),
        (f"{prefix}_garbage.txt", b"noise"),
        (f"{prefix}_bomb.png", bomb_png()),
        (f"{prefix}_bomb.txt", b"a huge picture"),
        (f"{prefix}_nocap.jpg", good),
        (f"{prefix}_nocap.json", b'{"url": "http://x.invalid/n"}'),
        (f"{prefix}_noimg.txt", b"a caption alone"),
    ]
    expected = {
        f"{prefix}_trunc": S.STATUS_DECODE_ERROR,
        f"{prefix}_garbage": S.STATUS_DECODE_ERROR,
        f"{prefix}_bomb": S.STATUS_TOO_LARGE,
        f"{prefix}_nocap": S.STATUS_MISSING_CAPTION,
        f"{prefix}_noimg": S.STATUS_MISSING_IMAGE,
    }
    return members, expected


def statuses(shard) -> dict[str, str]:
    return {
        row[S.KEY]: row[S.STATUS]
        for row, _ in (decode_sample(r, shard.url) for r in read_shard(shard))
    }


# ---- tests -------------------------------------------------------------------------------
def test_tar_keeps_keys_metadata_and_flags_every_failure_kind(tmp_path):
    tricky, expected = tricky_members()
    write_tar(tmp_path / "00000.tar", sample_members(3) + tricky)
    [shard] = list_shards(str(tmp_path))
    assert shard.format == WEBDATASET
    raws = list(read_shard(shard))
    assert [r.key for r in raws[:3]] == ["s00000", "s00001", "s00002"]
    assert raws[0].meta["shape"] and raws[0].caption
    got = statuses(shard)
    assert len(got) == 3 + len(expected)
    assert {k: got[k] for k in expected} == expected
    assert all(got[f"s{i:05d}"] == S.STATUS_OK for i in range(3))
    row, img = decode_sample(raws[0], shard.url)
    assert row[S.URL] == "http://x.invalid/s00000.jpg" and row["src_status"] == "success"
    assert (row[S.WIDTH], row[S.HEIGHT]) == (32, 32) and len(row[S.PHASH]) == 16
    assert len(row[S.SHA256]) == 64 and img.shape == (32, 32, 3) and img.dtype == np.uint8


def test_tar_cut_mid_member_keeps_earlier_samples_and_flags_the_cut_one(tmp_path):
    data = write_tar(tmp_path / "full.tar", sample_members(4))
    jpg_len = len(sample_members(1)[0][1])
    # cut inside the 3rd sample's image data: header(512) + some bytes
    offsets = {}
    with tarfile.open(tmp_path / "full.tar") as tar:
        for m in tar.getmembers():
            offsets[m.name] = m.offset_data
    cut = offsets["s00002.jpg"] + min(100, jpg_len // 2)
    (tmp_path / "00000.tar").write_bytes(data[:cut])
    (tmp_path / "full.tar").unlink()
    [shard] = list_shards(str(tmp_path))
    got = statuses(shard)
    assert got == {"s00000": S.STATUS_OK, "s00001": S.STATUS_OK, "s00002": S.STATUS_READ_ERROR}


def test_unopenable_shard_raises_with_its_name(tmp_path):
    (tmp_path / "00000.tar").write_bytes(b"")
    with pytest.raises(ShardOpenError, match="00000.tar"):
        list(read_shard(list_shards(str(tmp_path / "00000.tar"))[0]))
    missing = list_shards(str(tmp_path / "{00000..00001}.tar"))
    assert [s.name for s in missing] == ["00000.tar", "00001.tar"]
    with pytest.raises(ShardOpenError, match="00001.tar"):
        list(read_shard(missing[1]))


def test_parquet_with_image_bytes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    samples = list(iter_samples(5, size=32))
    table = pa.table(
        {
            "key": [f"p{i}" for i in range(5)],
            "jpg": [jpeg_bytes(s.image) for s in samples[:4]] + [None],
            "txt": [s.caption for s in samples],
            "url": [f"http://x.invalid/{i}" for i in range(5)],
            "status": ["success"] * 4 + ["failed_to_download"],
        }
    )
    pq.write_table(table, tmp_path / "00000.parquet", row_group_size=2)
    [shard] = list_shards(str(tmp_path))
    assert shard.format == PARQUET
    got = statuses(shard)
    assert got == {"p0": "ok", "p1": "ok", "p2": "ok", "p3": "ok", "p4": S.STATUS_MISSING_IMAGE}
    raws = list(read_shard(shard))
    assert raws[1].caption == samples[1].caption and raws[1].meta["url"] == "http://x.invalid/1"


def test_files_folder_format_and_folder_preference(tmp_path):
    shard_dir = tmp_path / "00000"
    shard_dir.mkdir()
    for name, data in sample_members(2):
        (shard_dir / name).write_bytes(data)
    (tmp_path / "00000.parquet").write_bytes(b"metadata only, never read as a shard")
    [shard] = list_shards(str(tmp_path))
    assert shard.format == FILES and shard.name == "00000"
    assert statuses(shard) == {"s00000": "ok", "s00001": "ok"}


def test_memory_fs_brace_pattern_sorted_part_numbers():
    import fsspec

    fs = fsspec.filesystem("memory")
    for i in (2, 0, 1):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name, data in sample_members(2, start=10 * i):
                _member(tar, name, data)
        fs.pipe(f"/sieve-test/shards/{i:05d}.tar", buf.getvalue())
    shards = list_shards("memory://sieve-test/shards/{00000..00002}.tar")
    assert [s.index for s in shards] == [0, 1, 2]
    assert [s.url for s in shards] == sorted(s.url for s in shards)
    assert all(s.url.startswith("memory://") for s in shards)
    assert [r.key for r in read_shard(shards[2])] == ["s00020", "s00021"]
    assert fingerprint(shards[0].url)["size"] > 0
    assert list_shards("memory://sieve-test/shards/*.tar") == shards
    fs.rm("/sieve-test", recursive=True)


def test_fingerprint_changes_when_shard_changes(tmp_path):
    write_tar(tmp_path / "00000.tar", sample_members(1))
    before = fingerprint(str(tmp_path / "00000.tar"))
    write_tar(tmp_path / "00000.tar", sample_members(2))
    assert fingerprint(str(tmp_path / "00000.tar")) != before


def test_phash_is_bit_identical_to_imagehash():
    import imagehash

    from pipelines.decode import phash

    images = [s.image for s in iter_samples(60, size=48, watermark_fraction=0.5)]
    images += [
        Image.new("RGB", (50, 80), (10, 200, 3)),
        Image.new("L", (7, 300)),
        Image.new("RGBA", (33, 33), (1, 2, 3, 4)),
    ]
    assert [phash(im) for im in images] == [str(imagehash.phash(im)) for im in images]


def test_numpy_thumbnails_equal_pillows_on_every_shape_and_pass_order():
    """Grey + 32x32 Lanczos done in numpy must give Pillow's exact bytes: down, up, mixed, equal."""
    from pipelines.phash import numpy_path, phash, phash_pixels, thumbnails, thumbnails_of

    rng = np.random.default_rng(0)
    shapes = [
        (64, 64),
        (32, 32),
        (48, 48),
        (1, 1),
        (7, 300),
        (31, 33),
        (20, 40),
        (300, 400),
        (224, 224),
        (32, 100),
        (13, 97),
        (45, 62),
        (20, 27),
    ]
    for h, w in shapes:
        batch = rng.integers(0, 256, (4, h, w, 3), dtype=np.uint8)
        batch[0], batch[1, :, ::2] = 255, 0  # saturated and striped: the clipping paths
        expected = np.stack(
            [
                np.asarray(
                    Image.fromarray(a).convert("L").resize((32, 32), Image.Resampling.LANCZOS),
                    np.float64,
                )
                for a in batch
            ]
        )
        assert np.array_equal(thumbnails(batch), expected), (h, w)
        # one at a time (PIL's grey above BATCH_MAX_PIXELS) gives the same bytes
        assert all(np.array_equal(phash_pixels(a), e) for a, e in zip(batch, expected)), (h, w)
    # PIL's path: large, and taller than wide; stacked groups of the numpy path in between
    others = [
        rng.integers(0, 256, shape + (3,), dtype=np.uint8)
        for shape in [(600, 520), (300, 7), (64, 40)]
    ]
    assert not any(numpy_path(a.shape) for a in others)
    mixed = [
        others[0],
        batch[0],
        rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        others[1],
        batch[1],
        others[2],
    ]
    assert all(
        np.array_equal(t, phash_pixels(Image.fromarray(a)))
        for t, a in zip(thumbnails_of(mixed), mixed)
    )
    assert [phash(a) for a in mixed] == [phash(Image.fromarray(a)) for a in mixed]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_direct_tar_parser_matches_tarfile(tmp_path, fmt):
    """Long names (GNU and pax), ustar prefixes, non-ASCII names, directories and gzip."""
    from collection.shards import read_tar

    deep = "d/" * 60 if fmt != tarfile.USTAR_FORMAT else "p/" * 40
    names = [f"{deep}k1.jpg", f"{deep}k1.txt", "k2.jpg", "k2.txt"]
    if fmt != tarfile.USTAR_FORMAT:
        names += ["naïve/ü.jpg", "naïve/ü.txt"]
    members = {n: (f"payload {n}" * (i + 1) * 37).encode() for i, n in enumerate(names)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        tar.addfile(_dir("emptydir"))
        for n, data in members.items():
            _member(tar, n, data)
    plain = tmp_path / "a.tar"
    plain.write_bytes(buf.getvalue())
    gz = tmp_path / "b.tar"  # compressed streams go through tarfile: same samples
    with tarfile.open(gz, mode="w:gz", format=fmt) as tar:
        for n, data in members.items():
            _member(tar, n, data)
    got = [(r.key, r.image, r.caption, r.error) for r in read_tar(str(plain))]
    assert got == [(r.key, r.image, r.caption, r.error) for r in read_tar(str(gz))]
    expected_keys = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in names))
    assert [k for k, *_ in got] == expected_keys
    assert got[0][1] == members[names[0]] and got[0][2] == members[names[1]].decode()
    assert all(err is None for *_, err in got)


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_samples_carry_their_images_byte_range(tmp_path, fmt):
    """Export reads images back by range: offset and size must address exactly the image bytes."""
    from collection.shards import read_tar

    deep = (
        "d/" * 60 if fmt != tarfile.USTAR_FORMAT else ""
    )  # GNU and pax long names: extra headers first
    names = [f"{deep}k1.jpg", f"{deep}k1.txt", "k2.png", "k2.txt", "k3.txt"]
    members = {n: (f"payload {n}" * (i + 3) * 37).encode() for i, n in enumerate(names)}
    path = tmp_path / "a.tar"
    with tarfile.open(path, mode="w", format=fmt) as tar:
        for n, data in members.items():
            _member(tar, n, data)
    raw = path.read_bytes()
    samples = list(read_tar(str(path)))
    assert [s.image == raw[s.offset : s.offset + s.size] for s in samples[:2]] == [True, True]
    assert samples[2].image is None and samples[2].offset is None
    row, _ = decode_sample(samples[1], str(path))
    assert (row[S.SOURCE_OFFSET], row[S.SOURCE_SIZE]) == (samples[1].offset, len(members["k2.png"]))
    gz = tmp_path / "b.tar"
    with tarfile.open(gz, mode="w:gz", format=fmt) as tar:
        _member(tar, "k1.jpg", b"x" * 10)
    assert [(s.offset, s.size) for s in read_tar(str(gz))] == [
        (None, None)
    ]  # no byte ranges in a stream


def _dir(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def test_chunked_reads_equal_plain_reads_across_chunk_edges():
    from collection.shards import _buffered

    data = bytes(range(256)) * 40
    sizes = [
        1,
        7,
        512,
        0,
        3000,
        13,
        512,
        5000,
        100,
    ]  # spans several 64-byte chunks, and past the end
    plain, chunked = io.BytesIO(data), _buffered(io.BytesIO(data), size=64)
    assert [chunked.read(n) for n in sizes] == [plain.read(n) for n in sizes]


def test_bad_header_mid_shard_ends_it_and_garbage_is_not_a_tar(tmp_path):
    from collection.shards import read_tar

    data = write_tar(tmp_path / "x.tar", sample_members(3))
    # sample 0 and 1 are 3 members of 512-byte header + data; corrupt the header after them
    with tarfile.open(tmp_path / "x.tar") as tar:
        third = [m for m in tar.getmembers() if m.name.startswith("s00002")][0].offset
    broken = bytearray(data)
    broken[third : third + 20] = b"garbage header bytes"
    (tmp_path / "y.tar").write_bytes(bytes(broken))
    assert [r.key for r in read_tar(str(tmp_path / "y.tar"))] == ["s00000", "s00001"]
    (tmp_path / "z.tar").write_bytes(b"x" * 2048)
    with pytest.raises(ShardOpenError, match="z.tar"):
        list(read_tar(str(tmp_path / "z.tar")))


def test_deferred_phash_matches_per_image_hash(tmp_path):
    """The worker hashes a chunk's thumbnails together; the rows must not change."""
    from pipelines.decode import PHASH_PENDING, finish_phashes

    tricky, _ = tricky_members()
    write_tar(tmp_path / "00000.tar", sample_members(5) + tricky)
    [shard] = list_shards(str(tmp_path))
    raws = list(read_shard(shard))
    direct = [decode_sample(r, shard.url)[0] for r in raws]
    deferred = [decode_sample(r, shard.url, defer_phash=True)[0] for r in raws]
    assert any(PHASH_PENDING in row for row in deferred)
    finish_phashes(deferred)
    assert deferred == direct
    assert sum(row[S.PHASH] is not None for row in direct) == 6  # 5 good + the captionless one


def test_fast_jpeg_decode_gives_pil_pixels_and_pil_errors():
    """The simplejpeg path must hand the model exactly what PIL would, and fail as PIL does."""
    from pipelines import decode
    from pipelines.decode import DEFAULT_MAX_PIXELS, decode_image

    assert decode._simplejpeg is not None, "simplejpeg is a dependency: the fast path must be live"
    images = [s.image for s in iter_samples(30, size=48, watermark_fraction=0.5)]
    images += [
        Image.new("RGB", (37, 91), (250, 10, 120)),
        Image.new("L", (20, 20), 99),
        Image.new("CMYK", (20, 20), (1, 2, 3, 4)),
    ]
    for img in images:
        for kwargs in ({"quality": 90}, {"quality": 70, "subsampling": 0}, {"progressive": True}):
            data = jpeg_bytes_with(img, **kwargs)
            fast, status, _ = decode_image(data, DEFAULT_MAX_PIXELS)
            slow = Image.open(io.BytesIO(data)).convert("RGB")
            assert status is None and fast.mode == "RGB" and fast.size == slow.size
            assert fast.tobytes() == slow.tobytes()
    data = jpeg_bytes_with(images[0])
    for bad in (data[: len(data) * 3 // 4], data[:40]):
        assert decode_image(bad, DEFAULT_MAX_PIXELS)[1] == S.STATUS_DECODE_ERROR
    assert decode_image(data, 48 * 48 - 1)[1] == S.STATUS_TOO_LARGE


def jpeg_bytes_with(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kwargs)
    return buf.getvalue()
