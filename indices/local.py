"""Where a searcher finds a collection's index and row files on local disk, so they can be
memory-mapped: in the collection itself when it is local, else in a cache folder of
`$SIEVE_CACHE` named after the collection's location.

A remote file is copied once and reused while it is unchanged. What says "unchanged" is the
one rule of `collection.storage.file_signature`: its size and its etag or modification time,
as the store reports them. A copied index is named after that signature, so a rebuilt remote
index is fetched again under a new name while a process still mapping the old copy keeps
reading it.
An index is complete when its json is there: `indices.build` writes it last.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import posixpath
from typing import Any

from collection import schema as S
from collection.parts import CollectionError
from collection.storage import (
    REMOTE_ERRORS,
    atomic_path,
    file_signature,
    is_local,
    read_json,
    url_to_fs,
)
from models.cache import cache_dir

log = logging.getLogger(__name__)

#: under $SIEVE_CACHE: one folder per collection location, laid out as the collection's own
CACHE_SUBDIR = "collections"


def signature(url: str) -> dict[str, Any]:
    """`collection.storage.file_signature` as a json-able dict (rows files record it in their
    schema metadata): {"size", "signature"}. FileNotFoundError when there is no such file."""
    sig = file_signature(url)
    if sig is None:
        raise FileNotFoundError(url)
    return {"size": sig[0], "signature": [str(v) for v in sig]}


def cache_folder(root: str) -> str:
    """The local folder standing in for collection `root` (one per location, never shared)."""
    where = os.path.abspath(url_to_fs(root)[1]) if is_local(root) else root
    digest = hashlib.sha1(where.encode()).hexdigest()[:16]
    return str(cache_dir() / CACHE_SUBDIR / digest)


def local_copy(url: str, folder: str) -> str:
    """A local copy of the remote file `url` in `folder`, named after its signature: fetched
    when missing or changed (older copies then removed), reused otherwise."""
    try:
        sig = signature(url)
    except FileNotFoundError:
        raise CollectionError(f"{url}: no such file") from None
    stem, ext = posixpath.splitext(posixpath.basename(url.rstrip("/")))
    key = hashlib.sha1(json.dumps([url, sig], sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(folder, f"{stem}.{key}{ext}")
    if os.path.exists(path):
        return path
    fs, remote = url_to_fs(url)
    log.info("%s: copying %s bytes to %s", url, sig["size"], path)
    try:
        with atomic_path(path) as tmp:
            fs.get_file(remote, tmp)
            if sig["size"] is not None and os.path.getsize(tmp) != sig["size"]:
                raise CollectionError(f"{url}: changed while it was copied; try again")
    except FileNotFoundError:
        raise CollectionError(f"{url}: removed while it was copied; try again") from None
    except CollectionError:
        raise
    except REMOTE_ERRORS as exc:
        raise CollectionError(f"{url}: cannot copy: {type(exc).__name__}: {exc}") from None
    for old in glob.glob(os.path.join(glob.escape(folder), f"{glob.escape(stem)}.*{ext}")):
        if old != path:
            _remove_quietly(old)
    return path


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)  # a process mapping it keeps its pages until it unmaps them
    except OSError as exc:
        log.info("%s: stale copy left in place: %s", path, exc)


def has_index(root: str, modality: str) -> bool:
    """Whether `modality`'s index of `root` is complete: its json, written last, is there."""
    fs, path = url_to_fs(S.CollectionLayout(root).index_json(modality))
    try:
        fs.invalidate_cache(path)
        return bool(fs.isfile(path))
    except REMOTE_ERRORS:
        return False


def index_files(root: str, modality: str) -> tuple[str, dict[str, Any]]:
    """(local path of `modality`'s index, its json): the collection's own file when local, a
    cached copy when remote. The json is read first, and must describe the index found."""
    layout = S.CollectionLayout(root)
    doc = read_json(layout.index_json(modality))
    if not isinstance(doc, dict):
        raise CollectionError(
            f"{layout.index_json(modality)}: no index; run `python -m indices.build {root}` first"
        )
    url = layout.index(modality)
    if is_local(root):
        path = url_to_fs(url)[1]
        if not os.path.exists(path):
            raise CollectionError(f"{path}: no index; run `python -m indices.build {root}` first")
    else:
        path = local_copy(url, os.path.join(cache_folder(root), S.INDICES_DIR))
    expected = doc.get("index_bytes")
    if expected is not None and os.path.getsize(path) != expected:
        raise CollectionError(
            f"{url}: {os.path.getsize(path)} bytes but {layout.index_json(modality)} records "
            f"{expected}: a build is running or was cut short; run `python -m indices.build {root}`"
        )
    return path, doc
