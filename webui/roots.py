"""Where the web UI may read and write: only under its data roots (`--data-root`, repeatable;
by default the collections it opened at start).

Every path a user types goes through here first: the image-path box (`read_image`), the
"Export to" folder (`export_folder`) and "Open another collection" (`inside_roots`). A path is
judged after `~`, `..` and every symlink are resolved, so neither a relative trick nor a link
placed under a root leads out of it. A refused path gets the same one-line message whether or
not it exists, so the answer says nothing about the server's files.
"""

from __future__ import annotations

import os
import posixpath
import stat
from typing import Iterable, Sequence

#: bytes the image-path box reads at most (the kNN server's body limit)
MAX_IMAGE_BYTES = 8 * 2**20
#: under a collection: where the Subset page exports by default (inside the default root)
EXPORTS_DIR = "exports"


class OutsideRoots(ValueError):
    """A typed path outside the data roots (or one that cannot be a path at all)."""


def _is_url(text: str) -> bool:
    return "://" in text


def normalise(path: str) -> str:
    """A root or a typed path in the form roots are compared in: a local path made absolute
    with every symlink resolved; a URL with its `..` and doubled slashes folded."""
    if _is_url(path):
        scheme, _, rest = path.partition("://")
        return f"{scheme.lower()}://{posixpath.normpath('/' + rest).lstrip('/')}"
    return os.path.realpath(os.path.expanduser(path))


def roots_of(paths: Iterable[str]) -> tuple[str, ...]:
    """Data roots from configured folders (or the opened collections), normalised, each once."""
    out: list[str] = []
    for p in paths:
        if p and normalise(p) not in out:
            out.append(normalise(p))
    return tuple(out)


def _under(path: str, root: str) -> bool:
    sep = "/" if _is_url(root) else os.sep
    return path == root or path.startswith(root.rstrip(sep) + sep)


def inside_roots(typed: str, roots: Sequence[str], what: str) -> str:
    """The normalised path `typed` names when it lies under one of `roots`; OutsideRoots
    otherwise, with a message that is the same whether or not the path exists."""
    text = str(typed).strip()
    refused = OutsideRoots(
        f"{what}: only paths under the app's data roots can be used "
        f"({', '.join(roots) or 'none'}); start the app with --data-root FOLDER to add one"
    )
    if not text or "\x00" in text:
        raise refused
    path = normalise(text)
    if not any(_under(path, r) for r in roots):  # a URL never lies under a local root
        raise refused
    return path


def read_image(typed: str, roots: Sequence[str], max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of an image file under the roots (the image-path box): a regular file of at
    most `max_bytes`; OutsideRoots, or ValueError naming the file when it cannot be read."""
    path = inside_roots(typed, roots, "image path")
    if _is_url(path):
        raise OutsideRoots(f"image path {typed}: give a file on this machine")
    try:
        # no symlink at the end (resolved above: one appearing now is a swap), and a FIFO
        # opened non-blocking cannot stall the page
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise ValueError(f"image path {typed}: cannot read it ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"image path {typed}: not a regular file")
        if info.st_size > max_bytes:
            raise ValueError(f"image path {typed}: larger than {max_bytes // 2**20} MiB")
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"image path {typed}: larger than {max_bytes // 2**20} MiB")
    return data


def export_folder(typed: str, roots: Sequence[str]) -> str:
    """The folder an export may write (the "Export to" box): under the roots, else OutsideRoots."""
    return inside_roots(typed, roots, "Export to")


def default_export(collection: str, name: str, roots: Sequence[str]) -> str:
    """Where the Subset page proposes to export subset `name`: beside the collection
    (`export-NAME`, as the README's command) when that is under a root, else inside it."""
    beside = os.path.join(os.path.dirname(collection.rstrip("/")), f"export-{name}")
    try:
        return inside_roots(beside, roots, "Export to")
    except OutsideRoots:
        return os.path.join(normalise(collection), EXPORTS_DIR, name)
