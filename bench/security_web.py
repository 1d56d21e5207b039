"""Attacks on the web side of Sieve, each driving the real function a page or the server calls:
the takedown list (bypassed by timing, case, caches, races, pages) and the kNN server's request
bodies (work, memory, cache and input bounds; aiohttp's test client on the real app) here, the
UI's typed paths and the SQL page's rendering of every DuckDB type in `bench.security_web_ui`.

`web_attacks(collection, workdir)` lists them all as (category, name, callable returning
(held, detail)) for `python -m bench.security`, which runs them with the SQL-side attacks and
writes bench/results/security.json; tests/test_security_web.py runs each one in the suite.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import tracemalloc
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow.dataset as pads

from bench import security_web_ui  # noqa: F401 - imported for its effect: the UI attacks register
from bench.security_lab import ATTACKS, REPO, SERVER, TAKEDOWN, Attack, Lab, attack
from bench.synthetic import clustered_vectors, write_collection
from collection import schema as S, takedown as T
from collection.parts import read_metadata
from curation.catalog import Catalog
from indices.app import App
from indices.build import build
from indices.search import QueryError, Searcher
from webui.components import visible_points


def web_attacks(collection: str, workdir: Path) -> list[Attack]:
    """(category, name, callable returning (held, detail)) for every web-side attack; nothing
    is built until an attack runs. `collection` needs an index; `workdir` is written into."""
    lab = Lab(collection, Path(workdir))
    return [(c, n, functools.partial(fn, lab)) for c, n, fn in ATTACKS]


def _listed_then(lab: Lab, gid: int, column: str = S.KEY, value: str | None = None) -> str:
    value = value if value is not None else lab.value(gid, column)
    T.add(lab.coll, **{{S.KEY: "keys", S.URL: "urls", S.SHA256: "sha256"}[column]: [value]})
    return value


# ---- takedown bypass ----------------------------------------------------------------------
@attack(TAKEDOWN, "search right after an add")
def _search_next(lab: Lab) -> tuple[bool, str]:
    i = lab.fresh()
    before = lab.query_ids(i)
    _listed_then(lab, before[0])
    after = lab.query_ids(i)
    return before[0] not in after, f"listed id {before[0]}; the next query returned {after}"


@attack(TAKEDOWN, "server request right after an add")
def _server_next(lab: Lab) -> tuple[bool, str]:
    i = lab.fresh()
    status, first = lab.post("/knn-service", lab.knn_body(i, num_images=6))
    _listed_then(lab, first[0]["id"])
    status, again = lab.post("/knn-service", lab.knn_body(i, num_images=6))
    ids = [r["id"] for r in again]
    return status == 200 and first[0]["id"] not in ids, f"listed {first[0]['id']}; next: {ids}"


@attack(TAKEDOWN, "server cached answer after an add")
def _server_cached(lab: Lab) -> tuple[bool, str]:
    i = lab.fresh()
    body = lab.knn_body(i, num_images=7)
    hits = lab.app.cache_hits._value.get()
    _, first = lab.post("/knn-service", body)
    _, cached = lab.post("/knn-service", body)
    was_cached = lab.app.cache_hits._value.get() > hits and cached == first
    _listed_then(lab, first[0]["id"])
    _, again = lab.post("/knn-service", body)
    ids = [r["id"] for r in again]
    held = was_cached and first[0]["id"] not in ids
    return held, f"cached before the add: {was_cached}; after it: {ids}"


@attack(TAKEDOWN, "server /metadata right after an add")
def _server_metadata(lab: Lab) -> tuple[bool, str]:
    i = lab.fresh()
    _listed_then(lab, i)
    status, meta = lab.post("/metadata", {"ids": [i], "indice_name": "c"})
    return status == 200 and meta == [{"id": i, "metadata": {}}], f"{status}: {meta}"


@attack(TAKEDOWN, "sha256 listed in upper case")
def _sha_upper(lab: Lab) -> tuple[bool, str]:
    i = lab.fresh()
    sha = lab.value(i, S.SHA256)
    _listed_then(lab, i, S.SHA256, sha.upper())
    return i not in lab.query_ids(i), f"listed {sha.upper()[:16]}… for id {i}"


@attack(TAKEDOWN, "sha256 listed in mixed case with spaces")
def _sha_mixed(lab: Lab) -> tuple[bool, str]:
    i = lab.fresh()
    sha = lab.value(i, S.SHA256)
    mixed = "  " + "".join(c.upper() if n % 2 else c for n, c in enumerate(sha)) + " "
    _listed_then(lab, i, S.SHA256, mixed)
    return not lab.searcher.visible([i])[0], f"listed {mixed.strip()[:16]}… for id {i}"


@attack(TAKEDOWN, "sha256 stored in upper case by another tool")
def _sha_stored_upper(lab: Lab) -> tuple[bool, str]:
    root = str(lab.workdir / "upper-sha")
    if os.path.exists(root):
        shutil.rmtree(root)
    vecs = clustered_vectors(64, 8, 4, seed=3)
    shas = [f"{i:064x}".replace("0", "A") for i in range(64)]  # A..F hex, upper case
    write_collection(root, [vecs], [vecs], columns={S.SHA256: shas})
    build(root)
    searcher = Searcher(root)
    T.add(root, sha256=[shas[3].lower()])
    meta = read_metadata(root)
    td = T.Takedown.load(root)
    scanned = pads.dataset(meta).to_table(filter=td.arrow_filter(meta.column_names))
    checks = {
        "searcher": not searcher.visible([3])[0],
        "mask": int(td.blocked_mask(meta).sum()) == 1,
        "scan": scanned.num_rows == meta.num_rows - 1,
    }
    return all(checks.values()), f"{checks}"


@attack(TAKEDOWN, "more like this on a listed row")
def _like_listed(lab: Lab) -> tuple[bool, str]:
    i = lab.fresh()
    _listed_then(lab, i)
    try:
        lab.searcher.vector([i], lab.modality)
    except QueryError as exc:
        return True, f"refused: {exc}"
    return False, f"the embedding of listed id {i} was served"


@attack(TAKEDOWN, "SQL filter naming a listed key")
def _filter_names_key(lab: Lab) -> tuple[bool, str]:
    i = lab.fresh()
    key = _listed_then(lab, i)
    try:
        ids = lab.query_ids(i, filters=f"{S.KEY} = '{key}'")
    finally:
        lab.searcher.close()
    return ids == [], f"filter on {key!r} returned {ids}"


@attack(TAKEDOWN, "detail records of a listed row")
def _records(lab: Lab) -> tuple[bool, str]:
    i = lab.fresh()
    _listed_then(lab, i, S.URL)
    rows = lab.searcher.records([i])
    return rows == [], f"records({i}) -> {len(rows)} rows"


@attack(TAKEDOWN, "Explore map hover after an add")
def _map_hover(lab: Lab) -> tuple[bool, str]:
    ids = np.arange(min(lab.searcher.count, 20_000))
    keys = lab.searcher.rows.take(ids, [S.KEY]).column(0).to_pylist()
    points = pd.DataFrame({"id": ids, S.KEY: keys, S.MAP_X: 0.0, S.MAP_Y: 0.0})
    i = lab.fresh()
    key = _listed_then(lab, i)
    shown = visible_points(points, lab.searcher)
    return key not in set(shown[S.KEY]), f"{len(points) - len(shown)} of {len(points)} hidden"


@attack(TAKEDOWN, "concurrent adds from threads")
def _threads(lab: Lab) -> tuple[bool, str]:
    keys = [f"bench-thread-{n}" for n in range(8)]
    start = threading.Barrier(len(keys))

    def add(key: str) -> None:
        start.wait()
        T.add(lab.coll, keys=[key])

    workers = [threading.Thread(target=add, args=(k,)) for k in keys]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    listed = set(T.list_entries(lab.coll).column(S.KEY).to_pylist())
    lost = sorted(set(keys) - listed)
    return not lost, f"lost: {lost}" if lost else f"all {len(keys)} landed"


@attack(TAKEDOWN, "concurrent adds from processes")
def _processes(lab: Lab) -> tuple[bool, str]:
    keys = [f"bench-process-{n}" for n in range(4)]
    code = "import sys; from collection import takedown as T; T.add(sys.argv[1], keys=sys.argv[2:])"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, lab.coll, k], cwd=REPO, env=env) for k in keys
    ]
    codes = [p.wait(300) for p in procs]
    listed = set(T.list_entries(lab.coll).column(S.KEY).to_pylist())
    lost = sorted(set(keys) - listed)
    return not lost and codes == [0] * 4, f"exit codes {codes}; lost: {lost}"


@attack(TAKEDOWN, "SQL page result kept after a change")
def _sql_page_guard(lab: Lab) -> tuple[bool, str]:
    before = T.list_signature(lab.coll)
    _listed_then(lab, lab.fresh())
    return T.list_signature(lab.coll) != before, "the page compares the list's signature"


@attack(TAKEDOWN, "a rewrite of the same size")
def _same_size(lab: Lab) -> tuple[bool, str]:
    watch = T.TakedownWatch(lab.coll)
    seen = []
    for key in ("bench-same-1", "bench-same-2", "bench-same-3"):
        T.remove(lab.coll, keys=["bench-same-1", "bench-same-2", "bench-same-3"])
        T.add(lab.coll, keys=[key])
        takedown, changed = watch.poll()
        seen.append(changed and key in takedown.keys)
    return all(seen), f"changes seen: {seen}"


@attack(TAKEDOWN, "untrusted SQL right after an add")
def _untrusted_sql(lab: Lab) -> tuple[bool, str]:
    i = lab.fresh()
    key = lab.value(i, S.KEY)
    sql = f"SELECT count(*) FROM samples WHERE {S.KEY} = '{key}'"
    with Catalog(lab.coll, untrusted=True) as cat:
        before = cat.query(sql).table.column(0)[0].as_py()
        T.add(lab.coll, keys=[key])
        after = cat.query(sql).table.column(0)[0].as_py()
    return before == 1 and after == 0, f"rows with the key: {before} before, {after} after"


# ---- server bodies ------------------------------------------------------------------------
def _refused(lab: Lab, path: str, body: Any, status: int, word: str) -> tuple[bool, str]:
    got, answer = lab.post(path, body)
    error = answer.get("error", "") if isinstance(answer, dict) else str(answer)[:200]
    alive, _ = lab.post("/knn-service", lab.knn_body(0))
    return got == status and word in error and alive == 200, f"{got}: {error[:160]}"


def _server_refusal(name: str, path: str, body: Callable[[Lab], Any], status: int, word: str):
    attack(SERVER, name)(lambda lab: _refused(lab, path, body(lab), status, word))


_server_refusal(
    "dedup over 10,000 results",
    "/knn-service",
    lambda lab: lab.knn_body(0, num_images=10_000, deduplicate=True),
    400,
    "deduplicate",
)
_server_refusal(
    "dedup over 10,000 result ids",
    "/knn-service",
    lambda lab: lab.knn_body(0, num_result_ids=10_000, deduplicate=True),
    400,
    "deduplicate",
)
_server_refusal(
    "a billion results",
    "/knn-service",
    lambda lab: lab.knn_body(0, num_images=10**9),
    400,
    "num_images",
)
_server_refusal(
    "results as a float string",
    "/knn-service",
    lambda lab: lab.knn_body(0, num_images="1e9"),
    400,
    "integers",
)
_server_refusal(
    "11,000 ids in one /metadata call",
    "/metadata",
    lambda lab: {"ids": list(range(11_000)), "indice_name": "c"},
    400,
    "at most",
)
_server_refusal(
    "a negative id", "/metadata", lambda lab: {"ids": [-1], "indice_name": "c"}, 400, "range"
)
_server_refusal(
    "ids that are not a list",
    "/metadata",
    lambda lab: {"ids": "0,1,2", "indice_name": "c"},
    400,
    "ids",
)
_server_refusal(
    "a JSON nesting 100,000 deep", "/knn-service", lambda lab: "[" * 100_000, 400, "nests"
)
_server_refusal(
    "a body over the size limit",
    "/knn-service",
    lambda lab: json.dumps({"text": "x" * (9 * 2**20), "indice_name": "c"}),
    413,
    "larger",
)
_server_refusal(
    "an embedding with NaN",
    "/knn-service",
    lambda lab: json.dumps(lab.knn_body(0)).replace("[", "[NaN, ", 1),
    400,
    "",
)
_server_refusal(
    "an embedding of 100,000 numbers",
    "/knn-service",
    lambda lab: lab.knn_body(0, embedding_input=[0.5] * 100_000),
    400,
    "dimension",
)
_server_refusal(
    "a URL for the server to fetch",
    "/knn-service",
    lambda lab: {"image_url": "http://127.0.0.1:9/x.jpg", "indice_name": "c"},
    403,
    "disabled",
)
_server_refusal(
    "an unknown index", "/knn-service", lambda lab: lab.knn_body(0, indice_name="../c"), 404, ""
)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims a huge canvas: signature, IHDR, a small IDAT, IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@attack(SERVER, "an image whose header claims 10^10 pixels")
def _png_bomb(lab: Lab) -> tuple[bool, str]:
    body = {"image": base64.b64encode(bomb_png()).decode(), "indice_name": "c"}
    return _refused(lab, "/knn-service", body, 413, "too large")


@attack(SERVER, "dedup at its bound: memory")
def _dedup_memory(lab: Lab) -> tuple[bool, str]:
    tracemalloc.start()
    try:
        status, rows = lab.post("/knn-service", lab.knn_body(0, num_images=4096, deduplicate=True))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    held = status == 200 and peak < 1 << 30
    return held, f"{status}, {len(rows)} rows, peak {peak / 2**20:.0f} MiB traced"


@attack(SERVER, "distinct queries against the cache bound")
def _cache_bytes(lab: Lab) -> tuple[bool, str]:
    bound, queries = 64 * 1024, 40
    small = App({}, searchers={"c": lab.searcher}, cache_bytes=bound)
    lab_app, lab.app = lab.app, small
    try:
        over, sent = 0, 0
        for n in range(queries):
            _, answer = lab.post(
                "/knn-service", lab.knn_body(n % lab.searcher.count, num_images=20)
            )
            sent += len(json.dumps(answer))
            over += small.cached_bytes > small.cache_bytes
    finally:
        lab.app = lab_app
    held = over == 0 and 0 < len(small.cache) < queries and sent > bound
    detail = f"{sent:,} bytes of answers; cache kept {len(small.cache)} in {small.cached_bytes:,}"
    return held, f"{detail} (bound {bound:,})"


def _summary(rows: list[dict[str, Any]]) -> str:
    return ", ".join(str(r.get("id")) for r in rows[:5])


# the dedup-free upper bound still answers: bounded work, not a refusal
@attack(SERVER, "10,000 results without dedup")
def _many_results(lab: Lab) -> tuple[bool, str]:
    status, rows = lab.post("/knn-service", lab.knn_body(0, num_images=10_000))
    return status == 200 and len(rows) <= 10_000, f"{status}: {len(rows)} rows ({_summary(rows)})"
