"""Readers for img2dataset's three output formats, from any fsspec URL.

`list_shards` turns an input spec (a folder, a file, a glob, a brace pattern such as
`data/{00000..00099}.tar`, or a list of them) into the sorted shard list whose positions
are the collection's part numbers. `read_shard` yields one `RawSample` per input sample,
keys kept from the source. A sample the shard cannot deliver whole (a tar cut mid-member, a
parquet row group that will not decode) still comes out, with `error` set, so the metadata
rows always match the input samples; a shard that cannot be opened raises `ShardOpenError`.
An empty tar (end-of-archive blocks only: img2dataset's shard whose every download failed)
is a shard of no samples.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import pyarrow.parquet as pq
from braceexpand import braceexpand

from collection.storage import url_to_fs as _fs

log = logging.getLogger(__name__)

WEBDATASET = "webdataset"
PARQUET = "parquet"
FILES = "files"
FORMATS = (WEBDATASET, PARQUET, FILES)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
CAPTION_EXTS = ("txt", "caption", "text")
#: parquet columns tried, in order, for the image bytes and the caption
PARQUET_IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "img", "image_bytes")
PARQUET_CAPTION_COLUMNS = ("txt", "caption", "text", "TEXT")
_GLOB_CHARS = "*?["


class ShardOpenError(RuntimeError):
    """The shard as a whole cannot be read (missing, unreadable, not the format it claims)."""


@dataclass(frozen=True)
class Shard:
    """One input shard: its fsspec URL, its img2dataset format and its part number."""

    url: str
    format: str
    index: int = 0

    @property
    def name(self) -> str:
        return posixpath.basename(self.url.rstrip("/"))


@dataclass
class RawSample:
    """One input sample before decoding. `error` set means the shard broke inside it."""

    key: str
    image: bytes | None
    caption: str | None
    meta: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    #: the sample's other members by extension (an export's `img_emb.npy`, say), as bytes
    other: dict[str, bytes] = field(default_factory=dict)
    #: where the image member's data starts in an uncompressed tar, and its size: export reads
    #: those bytes back by range (None from parquet, files and compressed tars)
    offset: int | None = None
    size: int | None = None


def _full_url(fs, path: str) -> str:
    """Re-attach the protocol for remote filesystems; plain paths stay plain."""
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        return path
    return fs.unstrip_protocol(path)


def format_of(url: str, is_dir: bool = False) -> str | None:
    """The img2dataset format a path holds, judged from its name (None: not a shard)."""
    if is_dir:
        return FILES
    lower = url.lower()
    if lower.endswith(".tar"):
        return WEBDATASET
    if lower.endswith(".parquet"):
        return PARQUET
    return None


def _shards_in_folder(fs, path: str) -> list[tuple[str, bool]]:
    """A folder of img2dataset output: its tars, else its `files` subfolders, else parquets.

    img2dataset writes a metadata-only parquet beside every tar and every files folder, so
    parquet files are the shards only when nothing else is there.
    """
    entries = fs.ls(path, detail=True)
    tars = [e["name"] for e in entries if e["type"] == "file" and e["name"].endswith(".tar")]
    if tars:
        return [(t, False) for t in tars]
    dirs = [
        e["name"]
        for e in entries
        if e["type"] == "directory"
        and not posixpath.basename(e["name"].rstrip("/")).startswith((".", "_"))
    ]
    if dirs:
        return [(d, True) for d in dirs]
    return [
        (e["name"], False)
        for e in entries
        if e["type"] == "file" and e["name"].endswith(".parquet")
    ]


def list_shards(input: str | Sequence[str], input_format: str = "auto") -> list[Shard]:
    """Expand an input spec into shards sorted by URL; a shard's position is its part number.

    Brace patterns are expanded; globs are matched; a folder contributes its shards. Named
    files are kept even when absent, so a missing shard is reported by name, not skipped.
    """
    if input_format not in ("auto", *FORMATS):
        raise ValueError(f"input_format must be auto or one of {FORMATS}, got {input_format!r}")
    specs = [input] if isinstance(input, str) else list(input)
    found: dict[str, str] = {}
    for spec in specs:
        for pattern in braceexpand(spec):
            fs, path = _fs(pattern)
            path = path.rstrip("/") or path
            if any(c in path for c in _GLOB_CHARS):
                candidates = [(p, fs.isdir(p)) for p in fs.glob(path)]
            elif fs.isdir(path):
                candidates = _shards_in_folder(fs, path)
            else:
                candidates = [(path, False)]
            for p, is_dir in candidates:
                fmt = input_format if input_format != "auto" else format_of(p, is_dir)
                if fmt is None:
                    if not any(c in path for c in _GLOB_CHARS):
                        raise ValueError(
                            f"{_full_url(fs, p)}: not a .tar, .parquet or folder "
                            f"shard; pass --input-format to say what it is"
                        )
                    continue
                found[_full_url(fs, p)] = fmt
    return [Shard(url, found[url], i) for i, url in enumerate(sorted(found))]


def fingerprint(url: str) -> dict[str, Any]:
    """Size, mtime and etag of a shard (a folder: totals over its files), to detect changes."""
    fs, path = _fs(url)
    try:
        if fs.isdir(path):
            infos = list(fs.find(path, detail=True).values())
        else:
            infos = [fs.info(path)]
    except (OSError, ValueError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    out: dict[str, Any] = {"size": sum(int(i.get("size") or 0) for i in infos), "files": len(infos)}
    mtimes = [
        i.get(k)
        for i in infos
        for k in ("mtime", "LastModified", "updated", "last_modified")
        if i.get(k) is not None
    ]
    if mtimes:
        out["mtime"] = str(max(mtimes, key=str))
    etags = [
        str(i.get(k))
        for i in infos
        for k in ("ETag", "etag", "md5Hash", "md5")
        if i.get(k) is not None
    ]
    if etags:
        out["etag"] = etags[0] if len(etags) == 1 else sorted(etags)
    return out


def split_member(name: str) -> tuple[str, str]:
    """webdataset's convention: key = path up to the basename's first dot, ext = the rest."""
    head, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return (posixpath.join(head, stem) if head else stem), ext.lower()


def _sample_from_members(
    key: str,
    members: dict[str, bytes],
    error: str | None = None,
    offsets: dict[str, int] | None = None,
) -> RawSample:
    """Assemble image bytes, caption, json metadata and the other members from one key's members
    (`offsets`: each member's data offset in its tar, where known)."""
    meta: dict[str, Any] = {}
    if "json" in members:
        try:
            loaded = json.loads(members["json"].decode("utf-8"))
            if isinstance(loaded, dict):
                meta = loaded
        except (UnicodeDecodeError, ValueError) as exc:
            log.warning("%s: unreadable json member (%s); metadata fields dropped", key, exc)
    image_ext = next((e for e in IMAGE_EXTS if e in members), None)
    caption_ext = next((e for e in CAPTION_EXTS if e in members), None)
    caption = members[caption_ext].decode("utf-8", errors="replace") if caption_ext else None
    if caption is None and isinstance(meta.get("caption"), str):
        caption = meta["caption"]
    other = {
        ext: data for ext, data in members.items() if ext not in (image_ext, caption_ext, "json")
    }
    image = members[image_ext] if image_ext else None
    offset = offsets.get(image_ext) if offsets and image_ext else None
    return RawSample(
        key, image, caption, meta, error, other, offset, len(image) if offset is not None else None
    )


class TarCut(Exception):
    """The stream ended inside a member: that member and whatever followed are lost.

    `name` is the member's name, or None when the cut hides it (inside a plain header, or
    inside the long-name or pax header that carried it).
    """

    def __init__(self, name: str | None, message: str):
        super().__init__(message)
        self.name = name


_BLOCK = 512
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")
#: tarfile's REGULAR_TYPES less GNU sparse, whose stored data is not the file's bytes
_REGULAR = (b"0", b"\0", b"7")
#: links, devices, fifos and directories: tarfile reads no data after them, whatever the size
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")
#: headers that describe the next one: GNU long name and long link name, pax extended (and
#: Solaris' pax) header; a pax global header is skipped (tarfile applies it only under an `x`)
_LONG_NAME, _LONG_LINK, _PAX, _PAX_SOLARIS, _PAX_GLOBAL = b"L", b"K", b"x", b"X", b"g"


def _octal(field: bytes) -> int:
    """A tar numeric field: octal text, or GNU base-256 when the top bit is set."""
    if field[:1] and field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _header_ok(block: bytes) -> bool:
    stored = block[148:156].split(b"\0", 1)[0].strip()
    try:
        want = int(stored, 8)
    except ValueError:
        return False
    rest = block[:148] + block[156:]
    unsigned = sum(rest) + 8 * 32
    if unsigned == want:
        return True
    return unsigned - 256 * sum(b > 127 for b in rest) == want  # old tars summed signed bytes


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """The records of a pax extended header ("LEN key=value\\n" each)."""
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space] or b"0")
        except ValueError:
            break
        if length <= 0:
            break
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key] = value
        pos += length
    return records


def _text(raw: bytes) -> str:
    """A name from a header or a long-name member: up to its first NUL, as tarfile decodes it."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _buffered(fh, size: int = 1 << 20):
    """`fh` behind a 1 MiB read buffer.

    A shard of small samples is three reads per member (header, data, padding); through
    fsspec's file wrapper each was a Python call chain and a syscall, much of the tar parse.
    """
    return io.BufferedReader(fh, buffer_size=size)


def _header(block: bytes) -> tuple[bytes, str, int] | None:
    """(type, name, size) of a 512-byte header block, or None when it is not one (bad checksum
    or number); names and types as tarfile reads them (ustar prefix, V7 directory)."""
    if not _header_ok(block):
        return None
    kind = block[156:157]
    name = _text(block[0:100])
    if kind == b"\0" and name.endswith("/"):
        kind = b"5"  # a V7 directory: a plain file whose name ends in a slash
    elif block[257:262] == b"ustar" and block[345] and kind not in (_LONG_NAME, _LONG_LINK):
        name = f"{_text(block[345:500])}/{name}"
    try:
        size = 0 if kind in _NO_DATA else _octal(block[124:136])
    except ValueError:
        return None
    return kind, name, size


def _tar_members(fh, url: str) -> Iterator[tuple[str, bytes, int | None]]:
    """(name, data, data offset in the file) of each regular file in an uncompressed tar stream,
    parsed directly: the members `tarfile` reads from the same bytes.

    tarfile builds a TarInfo and a file object per member and re-reads headers through
    several layers; for shards of small members that is a fifth of the reader's time. This
    reads ustar/GNU/pax headers (long names, pax sizes) and data in two reads per member.
    An all-zero block ends the archive; as the first block it makes an empty archive, which
    img2dataset writes for a shard whose every download failed. Raises ShardOpenError when the
    file is empty or does not start with a tar header; TarCut when the stream ends inside a
    member's data or inside a header. A bad header later ends the shard (logged), as in tarfile.
    """
    fh = _buffered(fh)
    pos = 0  # bytes consumed so far: headers and data are read in order, so this is the file offset
    last: str | None = None  # the last member read, for the log
    long_name: str | None = None  # from a GNU long-name or pax header, for the next member
    pax_size: int | None = None
    described = False  # a long-name, long-link or pax header announced a next header
    while True:
        block = fh.read(_BLOCK)
        end = len(block) == _BLOCK and block.count(0) == _BLOCK
        header = _header(block) if len(block) == _BLOCK and not end else None
        if header is None:
            if pos == 0 and not end:
                why = "truncated header" if block else "empty file"
                why = "not a tar header" if len(block) == _BLOCK else why
                raise ShardOpenError(f"cannot open shard {url} as a tar: {why}")
            if 0 < len(block) < _BLOCK:
                raise TarCut(long_name, f"stream ends {len(block)} bytes into the header at {pos}")
            if described:
                raise TarCut(long_name, f"no member header at byte {pos} after the one naming it")
            if block and not end:
                log.warning("%s: bad tar header at byte %d after %s; rest unread", url, pos, last)
            elif not end:
                log.warning("%s: tar ends after %s without an end-of-archive block", url, last)
            return
        pos += _BLOCK
        kind, name, size = header
        meta = kind in (_LONG_NAME, _LONG_LINK, _PAX, _PAX_SOLARIS, _PAX_GLOBAL)
        if pax_size is not None and not meta and kind not in _NO_DATA:
            size = pax_size
        data = fh.read(size) if size else b""
        if len(data) < size:
            cut = long_name if meta else long_name or name
            raise TarCut(cut, f"unexpected end of data: {len(data)} of {size} bytes")
        offset = pos
        pos += size
        if size % _BLOCK:
            pos += len(fh.read(_BLOCK - size % _BLOCK))
        if kind == _LONG_NAME:
            long_name = _text(data)
        elif kind in (_PAX, _PAX_SOLARIS):
            records = _pax_records(data)
            if b"path" in records:
                long_name = records[b"path"].decode("utf-8", "surrogateescape")
            if b"size" in records:
                pax_size = int(records[b"size"]) if records[b"size"].isdigit() else 0
        if meta:
            described = True
            continue
        if kind in _REGULAR:
            yield (long_name or name), data, offset
        last, long_name, pax_size, described = long_name or name, None, None, False


def _tarfile_members(fh, url: str) -> Iterator[tuple[str, bytes, int | None]]:
    """The same stream through tarfile: used for compressed tars (.tar.gz and the like), whose
    members cannot be read back by byte range (offset None)."""
    try:
        tar = tarfile.open(fileobj=fh, mode="r|*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ShardOpenError(f"cannot open shard {url} as a tar: {exc}") from exc
    try:
        for info in tar:
            if not info.isfile():
                continue
            try:
                yield info.name, tar.extractfile(info).read(), None
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise TarCut(info.name, str(exc)) from exc
    except (tarfile.TarError, OSError, EOFError) as exc:
        log.warning("%s: tar ends abruptly: %s", url, exc)


def read_tar(url: str) -> Iterator[RawSample]:
    """Stream a webdataset tar, grouping consecutive members by key.

    A member cut short yields its sample with `error` set; whatever follows the cut is
    unknowable and ends the shard (logged).
    """
    fs, path = _fs(url)
    try:
        fh = fs.open(path, "rb")
        head = fh.read(6)
        fh.seek(0)
    except (OSError, ValueError) as exc:
        raise ShardOpenError(f"cannot open shard {url}: {type(exc).__name__}: {exc}") from exc
    with fh:
        parse = _tarfile_members if head.startswith(_COMPRESSED_MAGIC) else _tar_members
        key: str | None = None
        members: dict[str, bytes] = {}
        offsets: dict[str, int] = {}
        try:
            for name, data, offset in parse(fh, url):
                k, ext = split_member(name)
                if k != key:
                    if key is not None:
                        yield _sample_from_members(key, members, offsets=offsets)
                    key, members, offsets = k, {}, {}
                members[ext] = data
                if offset is not None:
                    offsets[ext] = offset
        except TarCut as cut:
            if cut.name is None:  # the member the cut hides cannot get a row: its key is lost
                log.warning("%s: tar cut inside a header, its member's name lost: %s", url, cut)
                if key is not None:
                    yield _sample_from_members(key, members, offsets=offsets)
                return
            log.warning("%s: tar cut inside member %s: %s", url, cut.name, cut)
            k, _ = split_member(cut.name)
            if k != key:
                if key is not None:
                    yield _sample_from_members(key, members, offsets=offsets)
                key, members, offsets = k, {}, {}
            yield _sample_from_members(key, members, f"tar cut inside member {cut.name}: {cut}")
            return
        if key is not None:
            yield _sample_from_members(key, members, offsets=offsets)


def _parquet_column(names: Sequence[str], wanted: Sequence[str]) -> str | None:
    return next((c for c in wanted if c in names), None)


def _image_value(value: Any) -> bytes | None:
    """Image bytes from a binary cell or a Hugging Face style {"bytes": ...} struct."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return bytes(value) if value is not None else None


def read_parquet(url: str) -> Iterator[RawSample]:
    """Read a parquet shard with image bytes (img2dataset's `parquet` output), by row group.

    A row group that fails to decode yields one errored sample per row it holds (the footer
    knows the count), keyed `{shard}_{row}` when the keys themselves are lost.
    """
    fs, path = _fs(url)
    try:
        fh = fs.open(path, "rb")
        pf = pq.ParquetFile(fh)
    except Exception as exc:  # pyarrow raises its own error kinds for a bad footer
        raise ShardOpenError(
            f"cannot open shard {url} as parquet: {type(exc).__name__}: {exc}"
        ) from exc
    names = pf.schema_arrow.names
    image_col = _parquet_column(names, PARQUET_IMAGE_COLUMNS)
    if image_col is None:
        fh.close()
        raise ShardOpenError(
            f"shard {url} has no image column (tried {PARQUET_IMAGE_COLUMNS}); columns: {names}"
        )
    caption_col = _parquet_column(names, PARQUET_CAPTION_COLUMNS)
    stem = posixpath.splitext(posixpath.basename(path))[0]
    row = 0
    with fh:
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            try:
                records = pf.read_row_group(g).to_pylist()
            except Exception as exc:  # a damaged row group: keep the rest of the shard
                log.warning("%s: row group %d unreadable: %s", url, g, exc)
                for i in range(n):
                    yield RawSample(
                        f"{stem}_{row + i:06d}",
                        None,
                        None,
                        {},
                        f"parquet row group {g} unreadable: {exc}",
                    )
                row += n
                continue
            for rec in records:
                image = _image_value(rec.pop(image_col))
                caption = rec.pop(caption_col) if caption_col else None
                key = rec.get("key")
                key = str(key) if key not in (None, "") else f"{stem}_{row:06d}"
                yield RawSample(key, image, caption if isinstance(caption, str) else None, rec)
                row += 1


def read_files(url: str) -> Iterator[RawSample]:
    """Read a `files` shard: a folder of `{key}.jpg`, `{key}.txt`, `{key}.json`, sorted by key."""
    fs, path = _fs(url)
    try:
        if not fs.isdir(path):
            raise FileNotFoundError(path)
        names = sorted(fs.find(path))
    except (OSError, ValueError) as exc:
        raise ShardOpenError(
            f"cannot open shard {url} as a files folder: {type(exc).__name__}: {exc}"
        ) from exc
    groups: dict[str, dict[str, str]] = {}
    for name in names:
        key, ext = split_member(posixpath.relpath(name, path))
        if ext:
            groups.setdefault(key, {})[ext] = name
    for key, files in groups.items():
        members: dict[str, bytes] = {}
        error = None
        for ext, name in files.items():
            try:
                members[ext] = fs.cat_file(name)
            except OSError as exc:
                error = f"cannot read {name}: {exc}"
        yield _sample_from_members(key, members, error)


READERS = {WEBDATASET: read_tar, PARQUET: read_parquet, FILES: read_files}


def read_shard(shard: Shard) -> Iterator[RawSample]:
    """Yield the samples of one shard in source order (see the module doc for failures)."""
    return READERS[shard.format](shard.url)
