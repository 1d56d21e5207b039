"""The hand-written tar parser against Python's `tarfile`, on the same bytes.

tarfile is the reference: where it reads a member whole, Sieve reads the same name and bytes,
and the recorded offset (what becomes source_offset) addresses exactly those bytes; where it
stops on a cut, Sieve keeps the members before the cut and flags the sample the cut broke.
Archives are built with tarfile where it can write the case, by hand where it cannot.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest

from collection import schema as S
from collection.shards import (
    ShardOpenError,
    TarCut,
    _tar_members,
    list_shards,
    read_shard,
    read_tar,
    split_member,
)
from pipelines.decode import decode_sample
from tests.test_shards import _member


def tarfile_reads(raw: bytes) -> tuple[list[tuple[str, bytes, int]], bool]:
    """(name, data, data offset) of each regular member tarfile reads whole from `raw`, in
    order, and whether it raised before the end."""
    got = []
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
            for info in tar:
                if info.isfile():
                    got.append((info.name, tar.extractfile(info).read(), info.offset_data))
    except tarfile.ReadError:
        return got, True
    return got, False


def sieve_reads(raw: bytes) -> tuple[list[tuple[str, bytes, int]], Exception | None]:
    """The same from Sieve's parser, and the TarCut or ShardOpenError it raised, if any."""
    got = []
    try:
        for name, data, offset in _tar_members(io.BytesIO(raw), "mem.tar"):
            got.append((name, data, offset))
    except (TarCut, ShardOpenError) as exc:
        return got, exc
    return got, None


def same_members(raw: bytes) -> list[tuple[str, bytes, int]]:
    """Sieve's members of `raw`, checked against tarfile's and against the bytes themselves."""
    ours, theirs = sieve_reads(raw)[0], tarfile_reads(raw)[0]
    assert [m[0] for m in ours] == [m[0] for m in theirs]
    assert ours == theirs
    assert all(raw[offset : offset + len(data)] == data for _, data, offset in ours)
    return ours


def tar_bytes(members: list[tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """An archive as tarfile writes it (end-of-archive blocks, padded to a 10240-byte record)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            _member(tar, name, data)
    return buf.getvalue()


def read_bytes(raw: bytes, path: Path) -> list:
    """`read_tar` of `raw`, written to `path`."""
    path.write_bytes(raw)
    return list(read_tar(str(path)))


EMPTY_ARCHIVES = {
    "tarfile's own (a full 10240-byte record)": tar_bytes([]),
    "two zero blocks": b"\0" * 1024,
    "one zero block": b"\0" * 512,
    "zero blocks beyond a record": b"\0" * 10240 * 3,
}


@pytest.mark.parametrize("raw", EMPTY_ARCHIVES.values(), ids=EMPTY_ARCHIVES.keys())
def test_empty_archive_is_a_shard_of_no_samples(tmp_path, raw):
    """img2dataset writes a shard whose every download failed as end-of-archive blocks only."""
    assert tarfile_reads(raw) == ([], False)
    assert sieve_reads(raw) == ([], None)
    (tmp_path / "00000.tar").write_bytes(raw)
    (tmp_path / "00001.tar").write_bytes(gzip.compress(raw))  # compressed: read by tarfile
    shards = list_shards(str(tmp_path))
    assert [list(read_shard(shard)) for shard in shards] == [[], []]


def test_too_short_for_a_header_is_no_tar_for_either_reader(tmp_path):
    for raw, why in ((b"", "empty file"), (b"\0" * 10, "truncated header")):
        assert tarfile_reads(raw) == ([], True)
        err = sieve_reads(raw)[1]
        assert isinstance(err, ShardOpenError) and why in str(err)
        with pytest.raises(ShardOpenError, match=f"x.tar as a tar: {why}"):
            read_bytes(raw, tmp_path / "x.tar")


def test_ustar_prefix_joins_the_name(tmp_path):
    """ustar splits a path over 100 bytes into prefix (up to 155) + name."""
    deep = "a" * 70 + "/" + "b" * 60
    members = [(f"{deep}/k1.jpg", b"J" * 700), (f"{deep}/k1.txt", b"one"), ("k2.txt", b"two")]
    raw = tar_bytes(members, tarfile.USTAR_FORMAT)
    prefix, name = raw[345:500].rstrip(b"\0"), raw[0:100].rstrip(b"\0")
    assert prefix and prefix + b"/" + name == members[0][0].encode()  # the case is in the bytes
    ours = same_members(raw)
    assert [(n, d) for n, d, _ in ours] == members
    samples = read_bytes(raw, tmp_path / "x.tar")
    assert [s.key for s in samples] == [f"{deep}/k1", "k2"]
    assert raw[samples[0].offset : samples[0].offset + samples[0].size] == b"J" * 700


def test_gnu_long_names(tmp_path):
    long = "d" * 90 + "/" + "e" * 90 + "/k1"
    members = [(f"{long}.jpg", b"J" * 513), (f"{long}.txt", b"one"), ("k2.jpg", b"K" * 10)]
    raw = tar_bytes(members, tarfile.GNU_FORMAT)
    assert raw.count(b"././@LongLink") == 2
    assert [(n, d) for n, d, _ in same_members(raw)] == members
    samples = read_bytes(raw, tmp_path / "x.tar")
    assert [(s.key, s.image, s.caption) for s in samples] == [
        (long, b"J" * 513, "one"),
        ("k2", b"K" * 10, None),
    ]
    assert all(raw[s.offset : s.offset + s.size] == s.image for s in samples)


def test_pax_headers_long_and_unicode_names(tmp_path):
    latin1 = b"caf\xe9".decode("utf-8", "surrogateescape")  # not UTF-8: pax hdrcharset=BINARY
    names = ["p/" * 70 + "k1", "naïve/ü", "日本/猫", latin1]
    members = [
        (f"{n}.{ext}", f"{ext} of {n}".encode("utf-8", "surrogateescape"))
        for n in names
        for ext in ("jpg", "txt")
    ]
    raw = tar_bytes(members, tarfile.PAX_FORMAT)
    assert raw.count(b" path=") == len(members) and b"hdrcharset=BINARY" in raw
    assert [(n, d) for n, d, _ in same_members(raw)] == members
    samples = read_bytes(raw, tmp_path / "x.tar")
    assert [s.key for s in samples] == names
    assert all(raw[s.offset : s.offset + s.size] == s.image for s in samples)


def test_pax_size_record_overrides_the_header_size(tmp_path):
    """By hand: tarfile writes a pax `size` only past 8 GiB, and reads it whatever the size."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("k1.jpg")
        info.size, info.pax_headers = 700, {"size": "700"}
        tar.addfile(info, io.BytesIO(b"J" * 700))
        _member(tar, "k1.txt", b"one")
    raw = bytearray(buf.getvalue())
    header = raw.index(b"k1.jpg")  # the ustar header after the pax one: its size field says 0
    raw[header + 124 : header + 136] = b"00000000000\0"
    raw[header + 148 : header + 156] = b" " * 8
    raw[header + 148 : header + 155] = b"%06o\0" % sum(raw[header : header + 512])
    assert [(n, d) for n, d, _ in same_members(bytes(raw))] == [
        ("k1.jpg", b"J" * 700),
        ("k1.txt", b"one"),
    ]


def test_members_of_zero_bytes(tmp_path):
    members = [
        ("k1.jpg", b""),
        ("k1.txt", b""),
        ("k2.jpg", b"J" * 512),
        ("k2.txt", b""),
        ("k3.jpg", b""),
    ]
    raw = tar_bytes(members, tarfile.USTAR_FORMAT)
    ours = same_members(raw)
    assert [(n, d) for n, d, _ in ours] == members
    samples = read_bytes(raw, tmp_path / "x.tar")
    assert [(s.key, s.image, s.caption, s.error) for s in samples] == [
        ("k1", b"", "", None),
        ("k2", b"J" * 512, "", None),
        ("k3", b"", None, None),
    ]
    assert [(s.offset, s.size) for s in samples] == [(512, 0), (ours[2][2], 512), (ours[4][2], 0)]
    row, pixels = decode_sample(samples[0], "x.tar")
    assert row[S.STATUS] == S.STATUS_DECODE_ERROR and pixels is None


def test_trailing_zero_blocks_and_what_follows_them_end_the_archive(tmp_path):
    members = [("k1.jpg", b"J" * 600), ("k1.txt", b"one")]
    body = tar_bytes(members, tarfile.USTAR_FORMAT)[: 512 * 5]  # the members, no end blocks
    for tail in (b"\0" * 512, b"\0" * 512 * 7, b"\0" * 1024 + tar_bytes([("k9.jpg", b"x")]), b""):
        raw = body + tail
        assert [(n, d) for n, d, _ in same_members(raw)] == members
        assert [s.key for s in read_bytes(raw, tmp_path / "x.tar")] == ["k1"]


def test_links_directories_and_old_style_directories_carry_no_samples(tmp_path):
    """Types tarfile reads no data for, even when their size field says otherwise."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        _member(tar, "k1.jpg", b"J" * 100)
        for name, kind in (("dir", tarfile.DIRTYPE), ("v7dir/", tarfile.AREGTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.size = kind, 700  # a size field, and no data after it
            tar.addfile(info)
        link = tarfile.TarInfo("l" * 120 + ".jpg")  # GNU long name and long link name
        link.type, link.linkname = tarfile.SYMTYPE, "t" * 120 + ".jpg"
        tar.addfile(link)
        _member(tar, "k1.txt", b"one")
    raw = buf.getvalue()
    assert raw.count(b"././@LongLink") == 2
    assert [(n, d) for n, d, _ in same_members(raw)] == [("k1.jpg", b"J" * 100), ("k1.txt", b"one")]


def _cut_points(spans: list[tuple[int, int, int]]) -> list[int]:
    """Offsets to cut at around each member's headers and data: (first header, data, size)."""
    cuts = set()
    for start, data, size in spans:
        cuts |= {start + d for d in (0, 1, 99, 100, 263, 511)}
        cuts |= {data - 512 + d for d in (0, 1, 300, 511)}
        cuts |= {data + d for d in (0, 1, size // 2, size - 1, size, size + 1)}
        cuts.add(data + -(-size // 512) * 512)
    return sorted(c for c in cuts if 0 <= c <= spans[-1][1] + spans[-1][2])


@pytest.mark.parametrize(
    "fmt",
    [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT],
    ids=["ustar", "gnu", "pax"],
)
def test_cut_archive_keeps_what_tarfile_reads_and_flags_the_cut_sample(tmp_path, fmt):
    """Cut at every interesting offset: Sieve reads exactly tarfile's whole members; the sample
    the cut broke is a read_error row whenever its name survived the cut."""
    long = ("x" * 60 + "/" + "y" * 60 + "/k2") if fmt == tarfile.USTAR_FORMAT else "z/" * 60 + "k2"
    members = [
        ("k1.jpg", b"J" * 700),
        ("k1.txt", b"one"),
        ("k1.json", b'{"url": "u"}'),
        (f"{long}.jpg", b"L" * 600),
        (f"{long}.txt", b"two"),
        ("k3.jpg", b""),
        ("k3.txt", b"three"),
        ("k4.jpg", b"F" * 1024),
        ("k4.txt", b"four"),
    ]
    raw = tar_bytes(members, fmt)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        spans = [(m.offset, m.offset_data, m.size) for m in tar.getmembers()]
    for cut in _cut_points(spans):
        part = raw[:cut]
        ours = same_members(part)
        whole = [
            name for name, data, start in members_at(members, spans) if start + len(data) <= cut
        ]
        assert [n for n, *_ in ours] == whole, cut
        if cut < 512:
            with pytest.raises(ShardOpenError):
                read_bytes(part, tmp_path / "x.tar")
            continue
        expected = expected_rows(members, spans, cut)
        samples = read_bytes(part, tmp_path / "x.tar")
        assert [(s.key, s.error is not None) for s in samples] == expected, cut
        for s in samples:
            if s.error is None and s.image is not None:
                assert part[s.offset : s.offset + s.size] == s.image
    # its own header cut: the long-named sample's name came whole in the GNU or pax header
    # before it (a read_error row); ustar's prefix is in the cut header, so k1 ends the shard
    first, data, _ = spans[3]
    last = read_bytes(raw[: data - 212], tmp_path / "x.tar")[-1]
    assert (last.key, last.error is not None) == (
        (long, True) if fmt != tarfile.USTAR_FORMAT else ("k1", False)
    )
    assert (first < data - 512) == (fmt != tarfile.USTAR_FORMAT)


def members_at(members, spans):
    """(name, data, data offset) of each member, from tarfile's spans of the whole archive."""
    return [(name, data, start) for (name, data), (_, start, _) in zip(members, spans)]


def expected_rows(members, spans, cut: int) -> list[tuple[str, bool]]:
    """(key, flagged) per sample `read_tar` must give for the archive cut at `cut`.

    The members whose data is whole are kept, grouped by key. The first member that is not
    whole is the cut one: when the cut leaves its name readable (inside its data, or inside
    the header after a complete long-name or pax header), its sample is flagged read_error.
    """
    rows: list[list] = []
    for (name, _), (first, data, size) in zip(members, spans):
        key = split_member(name)[0]
        if data + size <= cut:
            if not rows or rows[-1][0] != key:
                rows.append([key, False])
            continue
        named = cut >= data or (first < data - 512 and cut >= data - 512)
        if first < cut and named:
            if not rows or rows[-1][0] != key:
                rows.append([key, False])
            rows[-1][1] = True
        break
    return [tuple(r) for r in rows]
