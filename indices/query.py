"""`python -m indices.query COLLECTION --text "a red circle" [--out clipsubset.json]`: one search,
saved.

What the UI's Search page does, as a command: a text query (weighted prompts, `"a red
star:1|blurry:-0.5"`), an image file, or "more like" a result's id; the image or text index;
safe mode, hidden near-duplicates and watermarked images; a SQL filter over the candidates.
The results are written as clip front's `clipsubset.json` (a JSON list of result rows:
`url`, `caption`, `id`, `similarity` and the metadata columns) or as parquet; at most
10,000, as clip front allows.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from collection.storage import write_bytes
from models.runtime import setup_logging

#: the most results one query may ask for (clip front's download cap)
MAX_RESULTS = 10_000
FORMATS = ("json", "parquet")
#: said when an answer is the index's approximate one (`Results.exact` false)
APPROXIMATE_NOTE = (
    "approximate: the best rows of the index's nearest lists, not compared with every row"
)


def results_json(rows: Sequence[dict[str, Any]]) -> bytes:
    """Result rows as clip front's `clipsubset.json`: a JSON list,
    indented as clip front writes it."""
    return (json.dumps(list(rows), indent=2, default=str) + "\n").encode()


def results_parquet(rows: Sequence[dict[str, Any]]) -> bytes:
    """Result rows as one parquet file (columns: the rows' keys, in order)."""
    buf = io.BytesIO()
    table = pa.Table.from_pylist(list(rows)) if rows else pa.table({"id": pa.array([], pa.int64())})
    pq.write_table(table, buf)
    return buf.getvalue()


def encode_results(rows: Sequence[dict[str, Any]], format: str) -> bytes:
    """`results_json` or `results_parquet` by name."""
    if format == "json":
        return results_json(rows)
    if format == "parquet":
        return results_parquet(rows)
    raise ValueError(f"--format: unknown {format!r}; expected one of {FORMATS}")


def query(
    collection: str,
    text: str | None = None,
    image: str | bytes | None = None,
    like: int | None = None,
    k: int = 40,
    modality: str = "image",
    filters: str | None = None,
    safe_mode: bool = False,
    hide_watermarked: bool = False,
    deduplicate: bool = True,
    out: str | None = None,
    format: str = "json",
    searcher: Any = None,
) -> list[dict[str, Any]]:
    """Search once and return the result rows; with `out`, write them there (atomically).

    Exactly one of `text`, `image` (a file path, or the file's bytes) or `like` (a result's
    id: its stored embedding is the query). `searcher` reuses a loaded `indices.search.Searcher`.
    k rows come back, or every row that passes when fewer do; the answer's `.exact` says whether
    they are the exact best ones (`indices.search.Results`)."""
    if format not in FORMATS:
        raise ValueError(f"--format: unknown {format!r}; expected one of {FORMATS}")
    if not 1 <= k <= MAX_RESULTS:
        raise ValueError(f"--k: {k} is outside 1..{MAX_RESULTS}")
    if sum(x is not None for x in (text, image, like)) != 1:
        raise ValueError("give exactly one of --text, --image or --like")
    from indices.search import (
        Searcher,
    )  # faiss and torch: imported after parsing, so --help answers at once
    from pipelines.decode import (
        DEFAULT_MAX_PIXELS,
        decode_image,
    )  # PIL and simplejpeg, with the search stack

    s = searcher if searcher is not None else Searcher(collection)
    kwargs: dict[str, Any] = {}
    if text is not None:
        kwargs["text"] = text
    elif image is not None:
        name = "the image given" if isinstance(image, bytes) else image
        try:
            if isinstance(image, bytes):
                data = image
            else:
                with open(image, "rb") as fh:
                    data = fh.read()
        except OSError as exc:
            raise ValueError(f"--image {name}: cannot read: {exc}") from None
        decoded, _, error = decode_image(data, DEFAULT_MAX_PIXELS)
        if decoded is None:
            raise ValueError(f"--image {name}: not a decodable image: {error}")
        kwargs["image"] = decoded
    else:
        kwargs["embedding"] = s.vector([like], modality)[0]
    rows = s.query(
        k=k,
        modality=modality,
        filters=filters or None,
        deduplicate=deduplicate,
        safe_mode=safe_mode,
        hide_watermarked=hide_watermarked,
        **kwargs,
    )
    if out:
        try:
            write_bytes(out, encode_results(rows, format))
        except OSError as exc:
            raise ValueError(f"--out {out}: cannot write: {exc}") from None
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m indices.query",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("collection")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help='weighted prompts, e.g. "a red star:1|blurry:-0.5"')
    src.add_argument("--image", help="an image file to search with")
    src.add_argument("--like", type=int, help="a result's id: search with its stored embedding")
    p.add_argument("--k", type=int, default=40, help=f"results (at most {MAX_RESULTS})")
    p.add_argument(
        "--modality", choices=["image", "text"], default="image", help="which index to search"
    )
    p.add_argument(
        "--filters", default=None, help="a SQL WHERE clause over the candidates' metadata and id"
    )
    p.add_argument("--safe-mode", action="store_true", help="hide rows with punsafe above 0.5")
    p.add_argument(
        "--hide-watermarked", action="store_true", help="hide rows with pwatermark above 0.8"
    )
    p.add_argument("--keep-duplicates", action="store_true", help="do not collapse near-duplicates")
    p.add_argument("--format", choices=FORMATS, default="json")
    p.add_argument(
        "--out", default=None, help="write the results here (clipsubset.json shape for json)"
    )
    a = p.parse_args(argv)
    if a.format == "parquet" and not a.out:
        p.error("--format parquet needs --out FILE")
    setup_logging()
    try:
        rows = query(
            a.collection,
            a.text,
            a.image,
            a.like,
            a.k,
            a.modality,
            a.filters,
            a.safe_mode,
            a.hide_watermarked,
            not a.keep_duplicates,
            a.out,
            a.format,
        )
    except (
        ValueError
    ) as exc:  # QueryError, CollectionError and SqlError are ValueErrors: one line each
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    exact = bool(getattr(rows, "exact", True))
    if not exact:
        print(APPROXIMATE_NOTE, file=sys.stderr)
    if a.out:
        print(json.dumps({"out": a.out, "results": len(rows), "exact": exact}))
    else:
        sys.stdout.buffer.write(results_json(rows))


if __name__ == "__main__":
    main()
