"""Exactly k rows for any k and any filter: how wide and deep to probe an index, and the exact
scan over the collection's own embeddings used where that is cheaper.

An IVF index answers from the lists it probes, so at its tuned nprobe a large k, or a filter that
few rows pass, gets fewer rows than asked for. `Planner.probe` widens the probe to the query's
nearest lists holding the candidates needed (by the lists' actual sizes), and answers None
("scan exactly") once that would read a large share of the collection or probe most lists: a
chunked scan of the embeddings then costs about as much and is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from indices.tune import quantizer_ef

#: scan exactly once the candidates needed reach this share of the vectors
EXACT_SHARE = 0.25
#: ... or once widening would probe more than this share of an IVF index's lists
MOST_LISTS = 0.5
#: deepest graph search of an HNSW index; a deeper one costs more than an exact scan of the few
#: hundred thousand vectors such an index holds (`indices.select.HNSW_MAX`)
HNSW_EF_MAX = 1 << 14
#: candidates asked for per row still wanted, over the filter's observed pass rate: PQ order
#: and near-duplicate collapse lose some
SLACK = 2.0


@dataclass(frozen=True)
class Probe:
    """One widened search: how many candidates, faiss's per-call parameters, and whether those
    candidates are the exact nearest ones (every list of an uncompressed IVF, or a flat index)."""

    depth: int
    params: Any
    exhaustive: bool


class Planner:
    """Probe planning for one loaded index (its list sizes read once)."""

    def __init__(self, index: Any) -> None:
        self.index = index
        self.count = int(index.ntotal)
        self.ivf = faiss.try_extract_index_ivf(index)
        #: the tuned nprobe (`indices.tune.set_search_params`): a widened probe never goes below
        self.nprobe = int(getattr(self.ivf, "nprobe", 1) or 1)
        if self.ivf is not None:
            inv = self.ivf.invlists
            self.sizes = np.array([inv.list_size(i) for i in range(self.ivf.nlist)], np.int64)
            self.nlist = int(self.ivf.nlist)
        # a flat quantizer ranks every list cheaply; anything else (HNSW) gets an estimate
        self.flat_quantizer = self.ivf is not None and isinstance(
            faiss.downcast_index(self.ivf.quantizer), faiss.IndexFlat
        )
        base = faiss.downcast_index(index)
        #: the IVF is the index itself, not behind a transform (OPQ) the quantizer cannot see
        self.direct = self.ivf is not None and not isinstance(base, faiss.IndexPreTransform)
        self.flat = isinstance(base, faiss.IndexFlat)
        self.hnsw = base if isinstance(base, faiss.IndexHNSW) else None
        self.flat_codes = self.ivf is not None and isinstance(
            faiss.downcast_index(self.ivf), faiss.IndexIVFFlat
        )

    def default_exact(self) -> bool:
        """Whether the index's own settings already give the exact nearest rows."""
        return self.flat or (self.flat_codes and self.nprobe >= self.nlist)

    def lists_for(self, q: np.ndarray, want: int) -> int | None:
        """How many of q's nearest lists hold `want` vectors; None when more than MOST_LISTS."""
        limit = max(1, int(MOST_LISTS * self.nlist))
        if self.flat_quantizer and self.direct:
            _, lists = self.ivf.quantizer.search(q.reshape(1, -1), min(self.nlist, limit + 1))
            held = np.cumsum(self.sizes[lists[0][lists[0] >= 0]])
            p = int(np.searchsorted(held, want)) + 1
        else:  # lists of average size, twice over for their unevenness
            p = math.ceil(2 * want * self.nlist / max(self.count, 1))
        return None if p > limit else max(p, self.nprobe)

    def probe(self, q: np.ndarray, want: int) -> Probe | None:
        """The search giving about `want` candidates for q; None where an exact scan is cheaper."""
        want = min(int(want), self.count)
        if want >= EXACT_SHARE * self.count:
            return None
        if self.hnsw is not None:  # a graph search finds about efSearch rows at most
            if want > HNSW_EF_MAX:
                return None
            ef = max(want, int(self.hnsw.hnsw.efSearch))
            return Probe(want, faiss.SearchParametersHNSW(efSearch=ef), False)
        if self.ivf is None:  # flat or scalar codes: every vector is scored
            return Probe(want, None, self.flat)
        p = self.lists_for(q, want)
        if p is None:
            return None
        params = faiss.SearchParametersIVF(nprobe=p)
        if not self.flat_quantizer:
            params.quantizer_params = faiss.SearchParametersHNSW(efSearch=quantizer_ef(p))
        if not self.direct:
            params = faiss.SearchParametersPreTransform(index_params=params)
        return Probe(want, params, self.flat_codes and p >= self.nlist)

    def search(self, q: np.ndarray, probe: Probe) -> np.ndarray:
        """Candidate ids (valid ones only) of one query under a planned probe."""
        _, found = self.index.search(q.reshape(1, -1), probe.depth, params=probe.params)
        return found[0][found[0] >= 0]


def top(ids: np.ndarray, sims: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k best entries by similarity, ties to the lower id."""
    if k < len(ids):  # a partial sort first: the ties at the cut stay in, lexsort orders them
        cut = np.partition(-sims, k - 1)[k - 1]
        keep = np.nonzero(-sims <= cut)[0]
        return keep[np.lexsort((ids[keep], -sims[keep]))[:k]]
    return np.lexsort((ids, -sims))[:k]


def want_for(k: int, share: float, floor: int) -> int:
    """Candidates to ask for so that about k of them pass a filter keeping `share` of rows."""
    return max(floor, math.ceil(SLACK * k / max(share, 1e-9)))
