"""The shared ground of the web attacks (`bench.security_web`, `bench.security_web_ui`): the
attack registry, and a `Lab` holding what they run against, made on first use: a copy of the
collection with a takedown list of its own (hard links where the file system allows, so a large
collection is not copied; every Sieve write replaces a file, so the original is never touched),
a searcher and the real server app over it, reached through aiohttp's test client."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
from aiohttp.test_utils import TestClient, TestServer

from collection import schema as S
from indices.app import App
from indices.search import Searcher

REPO = Path(__file__).resolve().parent.parent
TAKEDOWN = "takedown bypass"
SERVER = "server bodies"
PATHS = "UI paths"
RENDERING = "UI type rendering"
CATEGORIES = (TAKEDOWN, PATHS, SERVER, RENDERING)

Attack = tuple[str, str, Callable[[], tuple[bool, str]]]
#: (category, name, function of a Lab) in the order they run; `attack` adds to it
ATTACKS: list[tuple[str, str, Callable[["Lab"], tuple[bool, str]]]] = []


def attack(category: str, name: str) -> Callable:
    """Register a function of a `Lab` returning (held, detail) as an attack."""

    def register(fn: Callable[["Lab"], tuple[bool, str]]) -> Callable:
        ATTACKS.append((category, name, fn))
        return fn

    return register


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links refused: a plain copy
        shutil.copy2(src, dst)


class Lab:
    """What the attacks share, made on first use: a copy of the collection with a takedown list
    of its own, a searcher and the server app over it, and the UI's data root with an outside."""

    def __init__(self, collection: str, workdir: Path) -> None:
        self.source, self.workdir = collection, Path(workdir)
        self._used: set[int] = set()
        self._lock = threading.Lock()

    @functools.cached_property
    def coll(self) -> str:
        dst = self.workdir / "collection"
        if dst.exists():
            shutil.rmtree(dst)
        skip = shutil.ignore_patterns(S.TAKEDOWN_FILE + "*", "exports", "*.lock")
        shutil.copytree(self.source, dst, copy_function=_link_or_copy, ignore=skip)
        return str(dst)

    @functools.cached_property
    def searcher(self) -> Searcher:
        return Searcher(self.coll)

    @functools.cached_property
    def app(self) -> App:
        return App({}, searchers={"c": self.searcher})

    @functools.cached_property
    def modality(self) -> str:
        return self.searcher.modalities()[0]

    def fresh(self) -> int:
        """A global id no earlier attack used and the list does not name."""
        with self._lock:
            for i in range(self.searcher.count):
                if i not in self._used and self.searcher.visible([i])[0]:
                    self._used.add(i)
                    return i
        raise RuntimeError(f"{self.coll}: every row is used or listed")

    def vector(self, gid: int) -> list[float]:
        return self.searcher.index(self.modality)[2].gather(np.array([gid]))[0].tolist()

    def value(self, gid: int, column: str) -> Any:
        return self.searcher.rows.take(np.array([gid]), [column]).column(0)[0].as_py()

    def knn_body(self, gid: int, **fields: Any) -> dict[str, Any]:
        body = {"embedding_input": self.vector(gid), "indice_name": "c", "num_images": 5}
        return {"modality": self.modality, "deduplicate": False, **body, **fields}

    def post(self, path: str, body: Any) -> tuple[int, Any]:
        """One request to the real server app through aiohttp's test client (127.0.0.1)."""
        data = body if isinstance(body, (str, bytes)) else json.dumps(body)

        async def go() -> tuple[int, Any]:
            async with TestClient(TestServer(self.app.make())) as client:
                r = await client.post(path, data=data)
                text = await r.text()
                try:
                    return r.status, json.loads(text)
                except json.JSONDecodeError:
                    return r.status, text

        return asyncio.run(go())

    def query_ids(self, gid: int, **kw: Any) -> list[int]:
        rows = self.searcher.query(embedding=self.vector(gid), k=5, deduplicate=False, **kw)
        return [r["id"] for r in rows]
