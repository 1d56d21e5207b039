"""How Sieve writes and reads its files, on a local path or any fsspec URL.

Every file another process may read is written to a temporary name beside it and renamed
into place, so a reader sees the old file or the new one, never half of one; a job killed
mid-write leaves only a `*.tmp*` file that the next run overwrites. This is the one
implementation of that rule (collection parts, indices, checkpoints, bundled models,
benchmark results); collection.json is read and written here too. `file_lock` serialises
read-modify-write updates of one file (the takedown list, the bundled-model cache).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import fsspec

from collection import schema as S

TMP_MARK = ".tmp"

#: what a filesystem raises when a store cannot be reached or refuses us: OSError for most, but
#: object-store clients also raise their own types (botocore's NoCredentialsError,
#: EndpointConnectionError, ...) that share no base class we could name without naming a provider
REMOTE_ERRORS: tuple[type[BaseException], ...] = (Exception,)


def url_to_fs(url: str | os.PathLike) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for a local path or a URL."""
    return fsspec.core.url_to_fs(str(url))


def is_local(url: str | os.PathLike) -> bool:
    """Whether `url` is on the local filesystem (plain path or file://)."""
    fs, _ = url_to_fs(url)
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


#: what an object store's `info` says that changes when an object is rewritten
_REMOTE_SIGNATURE_FIELDS = ("ETag", "etag", "LastModified", "mtime", "generation", "md5")


def file_signature(url: str | os.PathLike) -> tuple | None:
    """What changes whenever the file at `url` is rewritten; None when there is no such file.

    The size first (an int; None where a store does not say), then for a local file the device,
    inode, mtime and ctime in nanoseconds (an atomic rewrite is a new inode, an in-place one a
    new mtime: one stat), for a remote one the etag and modification time, asked of the store
    each time (fsspec would otherwise answer from its listings cache). The one rule for "did
    this file change": the takedown list, rows files, local copies of index files, the SQL
    sandbox's copies of metadata parts.
    """
    fs, path = url_to_fs(url)
    if is_local(url):
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return (st.st_size, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
    fs.invalidate_cache(path)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    return (info.get("size"), *(str(info.get(k)) for k in _REMOTE_SIGNATURE_FIELDS))


def _tmp_name(path: str) -> str:
    # the pid keeps two writers of one file (two Dask workers, say) off each other's temp file
    return f"{path}{TMP_MARK}{os.getpid()}"


@contextlib.contextmanager
def atomic_open(url: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write `url` through, on a temporary name beside it; renamed into place
    when the block ends without an error, removed otherwise (streams files too big to hold)."""
    fs, path = url_to_fs(url)
    fs.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with fs.open(tmp, "wb") as fh:
            yield fh
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def write_bytes(url: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `url` atomically: a temporary name beside it, then a rename."""
    with atomic_open(url) as fh:
        fh.write(data)


@contextlib.contextmanager
def file_lock(url: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock named after `url` for the block: one holder at a time, whether in
    threads of this process or in other processes of this machine.

    A local file is locked through `URL.lock` beside it (flock: released by the kernel when its
    holder dies); an object store has no lock, so a remote URL is locked through a file in this
    machine's temp folder named after the URL, which serialises writers on one machine only.
    """
    if is_local(url):
        lock_path = _url_path(url) + ".lock"
        os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
    else:
        digest = hashlib.sha256(str(url).encode()).hexdigest()[:32]
        folder = os.path.join(tempfile.gettempdir(), "sieve-locks")
        os.makedirs(folder, exist_ok=True)
        lock_path = os.path.join(folder, f"{digest}.lock")
    # a descriptor of its own per holder: flock excludes other open files, threads included
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _url_path(url: str | os.PathLike) -> str:
    """The local path of a plain path or file:// URL."""
    return url_to_fs(url)[1]


def write_json(url: str | os.PathLike, doc: Any, indent: int | None = 2) -> None:
    """`write_bytes` of a JSON document (numpy scalars and other odd values as numbers/text)."""
    write_bytes(url, (json.dumps(doc, indent=indent, default=_json_default) + "\n").encode())


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalar
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def read_json(url: str | os.PathLike, missing: Any = None) -> Any:
    """The JSON document at `url`, or `missing` when there is no such file."""
    fs, path = url_to_fs(url)
    try:
        with fs.open(path, "rb") as fh:
            return json.loads(fh.read())
    except FileNotFoundError:
        return missing


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A local temporary path to write a file (or a folder) into; renamed to `path` on success.

    For writers that want a file name rather than bytes (faiss.write_index, torch.save,
    safetensors, a training run's output folder). On an error the temporary is removed and
    `path` is left as it was. A folder replaces an existing folder of the same name.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _tmp_name(path)
    _remove(tmp)
    try:
        yield tmp
        if os.path.isdir(tmp) and os.path.isdir(path):
            old = f"{tmp}.old"
            os.replace(path, old)  # a folder cannot be renamed over a non-empty one
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def write_collection_json(root: str, info: dict[str, Any]) -> dict[str, Any]:
    """Write collection.json (schema version, creation time, then `info`) atomically; return it."""
    doc = {
        "schema_version": S.SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **info,
    }
    write_json(S.CollectionLayout(root).collection_json, doc)
    return doc


def read_collection_json(root: str) -> dict[str, Any]:
    """collection.json as a dict; {} when absent (clip-retrieval's folders and test fixtures
    lack it)."""
    return read_json(S.CollectionLayout(root).collection_json, missing={})
