"""Pick a FAISS index key from the vector count, the dimension and a memory budget.

The rules follow the shape of autofaiss's published ones (exact search while it is cheap,
graph or IVF while raw vectors fit, OPQ+IVF+PQ once they do not), re-derived here, plus one
Sieve difference: PQ indices are re-ranked exactly against the collection's own
memory-mapped float16 embeddings, so PQ only has to produce a good candidate list.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

#: Below this many vectors an exact scan costs well under a millisecond per query.
FLAT_MAX = 20_000
#: Up to this many vectors an HNSW graph builds in a reasonable time on a few cores.
HNSW_MAX = 300_000
HNSW_M = 32
#: Bytes every IVF entry costs besides its code (the int64 id).
ID_BYTES = 8
#: faiss's k-means warns below 39 training points per centroid
MIN_PER_LIST = 39
#: share of the memory budget the training sample may take (`nlist_for`), and the room it
#: always has: a small serving budget does not make a build machine's sample small
TRAIN_SHARE = 0.25
TRAIN_MIN_BYTES = 2**30


@dataclass(frozen=True)
class Choice:
    """The key to build, whether results are re-ranked exactly, and why it was chosen."""

    index_key: str
    rerank: bool
    estimated_bytes: int
    reason: str


def parse_bytes(text: str | int) -> int:
    """'4G', '100M', '512k' or a plain number of bytes -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgGtT]?)i?[bB]?\s*", str(text))
    if not m:
        raise ValueError(f"--max-index-memory: cannot read {text!r}; use e.g. 4G, 100M, 512k")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def nlist_for(n: int, dim: int = 512, budget: int | None = None) -> int:
    """IVF list count: a power of two near 4·sqrt(n), at least 16 and at most n / MIN_PER_LIST;
    halved while its training sample (MIN_PER_LIST float32 points per list) would take more
    than TRAIN_SHARE of the memory budget (TRAIN_MIN_BYTES at least), as the builder holds that
    sample while it trains."""
    target = 4 * math.sqrt(max(n, 1))
    nlist = 2 ** int(round(math.log2(max(target, 16))))
    nlist = int(max(16, min(nlist, 2**16, max(16, n // MIN_PER_LIST))))
    room = None if budget is None else max(TRAIN_SHARE * budget, TRAIN_MIN_BYTES)
    while room is not None and nlist > 16 and MIN_PER_LIST * nlist * dim * 4 > room:
        nlist = max(16, nlist // 2)
    return nlist


def estimate_bytes(index_key: str, n: int, dim: int) -> int:
    """Rough resident size of a populated index (codes, ids, graph links, centroids)."""
    quantizer = 0
    m = re.search(r"IVF(\d+)", index_key)
    if m:
        nlist = int(m.group(1))
        quantizer = nlist * dim * 4 + (nlist * HNSW_M * 2 * 4 if "_HNSW" in index_key else 0)
    pq = re.search(r"PQ(\d+)(?:x(\d+))?", index_key)
    opq = re.search(r"OPQ(\d+)_(\d+)", index_key)
    if opq:
        quantizer += int(opq.group(2)) * dim * 4
    if pq:
        m_codes, nbits = int(pq.group(1)), int(pq.group(2) or 8)
        return (
            quantizer
            + n * (m_codes * nbits // 8 + ID_BYTES)
            + m_codes * 2**nbits * 4 * (dim // m_codes)
        )
    if index_key.startswith("HNSW"):
        return n * (dim * 4 + HNSW_M * 2 * 4 + 8)
    if "SQ8" in index_key:
        return quantizer + n * (dim + (ID_BYTES if m else 0))
    if index_key == "Flat":
        return n * dim * 4
    return quantizer + n * (dim * 4 + ID_BYTES)  # IVF,Flat


#: most PQ sub-quantizers (4 dimensions each at 512-d). A narrower sub-vector costs no
#: encoding time (every code still compares d x 256 values) and keeps the true neighbours among
#: the candidates the exact re-rank sees, which 8-dimension sub-vectors lost at 10M rows
#: (bench/results/index.json scale_10m, rerank_sweep)
PQ_MAX_M = 128


def pq_codes_for(n: int, dim: int, budget: int, nlist: int, max_m: int = PQ_MAX_M) -> int | None:
    """Largest PQ code size (bytes/vector, dividing dim) whose index fits the budget."""
    for m in sorted({d for d in range(4, min(dim, max_m) + 1) if dim % d == 0}, reverse=True):
        key = f"IVF{nlist},PQ{m}x8"
        if estimate_bytes(key, n, dim) <= budget:
            return m
    return None


def choose_index(n: int, dim: int, max_memory: int | str = "4G", ivf: bool = False) -> Choice:
    """The index key for n vectors of dim under max_memory bytes (see module docstring); with
    `ivf`, an IVF key whatever n (the distributed build adds and merges inverted lists)."""
    budget = parse_bytes(max_memory)
    flat = n * dim * 4
    if n <= FLAT_MAX and flat <= budget and not ivf:
        return Choice("Flat", False, flat, f"{n} vectors: an exact scan is fast enough")
    if n <= FLAT_MAX and n * dim <= budget and not ivf:
        return Choice(
            "SQ8",
            False,
            n * dim,
            f"{n} vectors but flat ({flat} B) exceeds the budget: 8-bit scalar codes",
        )
    # a small collection under a budget SQ8 misses falls through to IVF+PQ with exact re-ranking
    nlist = nlist_for(n, dim, budget)
    hnsw = estimate_bytes(f"HNSW{HNSW_M}", n, dim)
    if n <= HNSW_MAX and hnsw <= budget and not ivf:
        return Choice(f"HNSW{HNSW_M}", False, hnsw, "raw vectors and the graph fit the budget")
    ivf_flat = estimate_bytes(f"IVF{nlist},Flat", n, dim)
    quant = f"IVF{nlist}_HNSW{HNSW_M}" if nlist > 4096 else f"IVF{nlist}"
    if ivf_flat <= budget:
        return Choice(f"{quant},Flat", False, ivf_flat, "raw vectors fit the budget: IVF over them")
    m = pq_codes_for(n, dim, budget, nlist)
    if m is None:
        raise ValueError(f"no index of {n}x{dim} fits in {budget} bytes; raise --max-index-memory")
    key = f"{quant},PQ{m}x8"
    return Choice(
        key,
        True,
        estimate_bytes(key, n, dim),
        f"raw vectors ({flat} B) exceed the budget: {m}-byte PQ codes, "
        "exact re-rank from the mmapped embeddings",
    )
