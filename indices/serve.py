"""`python -m indices.serve --collection NAME=PATH [--collection ...] [--port 1234]`: the kNN
server.

HTTP, wire-compatible with clip-retrieval's `clip back` (its ClipClient works unchanged):
POST /knn-service, POST /metadata, GET /indices-list, plus GET /health and Prometheus
GET /metrics. The application is `indices.app.App`.
"""

from __future__ import annotations

import argparse

from models.runtime import setup_logging
from models.specs import PRECISIONS, check_precision


def serve(
    collection: list[str],
    port: int = 1234,
    host: str = "127.0.0.1",
    allow_image_url: bool = False,
    precision: str = "fp32",
    cache_bytes: str | int = "64MiB",
    max_batch: int | None = None,
    threads: int | None = None,
) -> None:
    """Serve NAME=PATH collections until interrupted; max_batch None: the app's default;
    cache_bytes a size such as 64MiB (0: no cache)."""
    check_precision(precision)
    # DuckDB behind it: imported once the arguments are read, so --help answers at once
    from collection.sandbox import parse_size

    cache = parse_size(str(cache_bytes))
    pairs = {}
    for c in collection:
        name, sep, path = c.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--collection: expected NAME=PATH, got {c!r}")
        pairs[name] = path
    # heavy (torch, aiohttp, faiss): imported after argument parsing, so --help answers at once
    import torch
    from aiohttp import web

    from indices.app import App  # same reason

    if threads:
        torch.set_num_threads(threads)
    batching = {"max_batch": max_batch} if max_batch else {}
    app = App(
        pairs,
        allow_image_url=allow_image_url,
        precision=precision,
        cache_bytes=cache,
        **batching,
    )
    web.run_app(app.make(), host=host, port=port)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m indices.serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--collection", action="append", required=True, help="NAME=PATH, repeatable")
    p.add_argument("--port", type=int, default=1234)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument(
        "--allow-image-url", action="store_true", help="let clients make the server fetch URLs"
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="text tower weights; bf16 only where the CPU/GPU has native bf16 (else fp32); "
        "int8 quantized, on the CPU",
    )
    p.add_argument(
        "--cache-bytes",
        default="64MiB",
        help="bytes of answers the LRU cache keeps, e.g. 256MB (0: off)",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="most concurrent queries encoded together (default: indices.app.MAX_BATCH)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    a = p.parse_args(argv)
    setup_logging()
    try:
        serve(
            a.collection,
            a.port,
            a.host,
            a.allow_image_url,
            a.precision,
            a.cache_bytes,
            a.max_batch,
            a.threads,
        )
    except ValueError as exc:
        p.error(str(exc))


if __name__ == "__main__":
    main()
