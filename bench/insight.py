"""`python -m bench.insight [--only copies,semantic,concepts,search_concepts,score,map]
[--work DIR]` →
bench/results/insight.json.

Data (shared by copies, semantic and concepts; built once under --work, reused): `--n`
generated samples (`pipelines.generate`, seed 0) with `--copy-fraction` planted copies (exact,
re-encoded, resized, cropped, colour-shifted, overlaid: json `dup_of`), 10% watermarked,
coarse noisy backgrounds, small and medium objects (a large single object has no position
jitter, so two distinct samples of one description would be the same picture up to a slight
rotation: planted copies must be the only copies), embedded with sieve-tiny and the watermark
score, with an image index.

- copies: `curation.dedup --level copies` against the planted truth (`copies_precision`,
  `copies_recall`, goals ≥ 0.95), beside clip back's rule (cosine ≥ 0.94, connected components)
  and a plain perceptual-hash rule (Hamming distance ≤ T, each T of a small sweep) on the same
  data. Precision and recall count removals: in each found group, members beyond one that
  share a true original are correct removals; recall divides by what the truth removes.
- semantic: SemDeDup alone on the data's image embeddings, removed fraction per ε
  (`semantic_removed_fraction`), and the time of the whole semantic pass (clustering, one task
  per cluster group run in this process, pairwise links) on `--semantic-sizes` clustered
  synthetic vectors (`semantic_cost_ratio_1m_vs_100k`, goal ≤ 12).
- concepts: "contains a star", "on a noisy background", "watermarked"; `--draws` random draws
  of 10 positive + 10 negative labels; AUROC on every other sample for zero-shot (the prompt's
  similarity to the image), Lilac's recipe (balanced logistic regression, no prior, on the
  caption embeddings as Lilac does; `lilac_image`: the same on image embeddings) and Sieve's
  probe (`concept_auroc_20_labels`, means over draws).
- search_concepts: concepts labelled as people label, from a search's first page
  (`bench.insight_concepts`, `concept_auroc_search_labels`).
- score: `curation.concept_probe.score_vectors` of an image+text probe over `--score-n`
  memory-mapped float16 vectors per modality (`concept_score_10m_seconds`, goal ≤ 5 s on 2 cores;
  page cache warmed by one untimed pass, median of `--repeats`).
- map: `curation.map` layout of `--map-n` CLIP-like vectors,
  all laid out by UMAP (`map_100k_seconds`).

Absolute times belong to a quiet machine; run reduced sizes elsewhere to check it works.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from typing import Any, Callable

import faiss
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from bench.common import write_results
from bench.insight_concepts import run_search_concepts
from bench.synthetic import clip_like_pairs, clustered_vectors, write_collection
from collection import schema as S
from collection.embeddings import EmbeddingStore
from collection.parts import read_metadata
from curation.concept_probe import Concept, fit_concept, score_collection, score_vectors
from curation.copies import phash_bits
from curation.dedup import dedup, read_duplicates
from curation.map import compute_map
from curation.semdedup import EPS_TABLE, ArrayVectors, SemanticParams, group_links, root_groups
from indices.build import build
from indices.search import DEDUP_THRESHOLD
from models.clip import load_clip
from models.runtime import cores, setup_logging
from pipelines.embed import embed
from pipelines.generate import write_sample_dataset

log = logging.getLogger("bench.insight")

CONCEPTS: dict[str, tuple[str, str]] = {  # name -> (prompt, truth)
    "star": ("a star", "shape == 'star'"),
    "noisy_background": ("a shape on a noisy background", "background == 'noise'"),
    "watermarked": ("a picture with a watermark", "watermark"),
}
PHASH_THRESHOLDS = (4, 8, 12, 16)


def data(work: str, n: int, copy_fraction: float, workers: int | None) -> str:
    """The shared generated collection (built once)."""
    shards, collection = os.path.join(work, "shards"), os.path.join(work, "collection")
    if not os.path.exists(os.path.join(shards, S.stats_name((n - 1) // 1000))):
        write_sample_dataset(
            shards,
            n,
            seed=0,
            watermark_fraction=0.1,
            shard_size=1000,
            object_sizes=["small", "medium"],
            near_duplicate_fraction=copy_fraction,
            noise_texture="coarse",
        )
    embed(shards, collection, workers=workers, scores="watermark")
    if not os.path.exists(S.CollectionLayout(collection).index_json(S.MODALITY_IMAGE)):
        build(collection, max_index_memory="1G", modality="image")
    return collection


def removal_scores(pred_root: np.ndarray, true_root: np.ndarray) -> dict[str, float]:
    """Removal precision / recall: within each predicted group, members beyond one that share a
    true original are correct removals (independent of which member a rule keeps)."""
    pairs = np.stack([pred_root, true_root], 1)
    _, both = np.unique(pairs, axis=0, return_counts=True)
    _, pred = np.unique(pred_root, return_counts=True)
    _, true = np.unique(true_root, return_counts=True)
    correct, removed, expected = int((both - 1).sum()), int((pred - 1).sum()), int((true - 1).sum())
    precision = correct / removed if removed else 1.0
    recall = correct / expected if expected else 1.0
    return {
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "removed": removed,
        "correct": correct,
        "expected": expected,
    }


def _components(n: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _truth(collection: str) -> tuple[np.ndarray, Any]:
    meta = read_metadata(collection).to_pandas()
    index = {k: i for i, k in enumerate(meta[S.KEY])}
    root = np.array([index[d] if isinstance(d, str) else i for i, d in enumerate(meta["dup_of"])])
    return root, meta


def run_copies(
    work: str, n: int = 20_000, copy_fraction: float = 0.05, workers: int | None = None
) -> dict[str, Any]:
    collection = data(work, n, copy_fraction, workers)
    true_root, meta = _truth(collection)
    t = time.perf_counter()
    # exact then copies, as the measured figures always were (levels now run alone by default)
    levels = (S.LEVEL_EXACT, S.LEVEL_COPIES)
    report = dedup(collection, levels, workers=workers, run="bench-copies")
    seconds = time.perf_counter() - t
    table = read_duplicates(collection, run="bench-copies").to_pandas()
    index = {k: i for i, k in enumerate(meta[S.KEY])}
    pred = np.arange(len(meta))
    pred[[index[k] for k in table[S.DUP_KEY]]] = len(meta) + table[S.DUP_GROUP].to_numpy()
    sieve = removal_scores(pred, true_root)
    found = set(table[S.DUP_KEY])
    transforms = meta["transform"].fillna("")
    per_transform = {
        t: round(float(np.mean([k in found for k in meta[S.KEY][transforms == t]])), 4)
        for t in sorted(set(transforms) - {""})
    }
    x = np.concatenate(
        [a for _, a in EmbeddingStore.open(collection, S.MODALITY_IMAGE).iter_parts()]
    )
    index_ip = faiss.IndexFlatIP(x.shape[1])
    index_ip.add(x)
    lims, _, ids = index_ip.range_search(x, DEDUP_THRESHOLD)
    rows = np.repeat(np.arange(len(x)), np.diff(lims.astype(np.int64)))
    clip_back = removal_scores(_components(len(x), rows, ids), true_root)
    bits = phash_bits(meta[S.PHASH].tolist())
    binary = faiss.IndexBinaryFlat(64)
    binary.add(bits)
    phash = {}
    for limit in PHASH_THRESHOLDS:
        lims, _, ids = binary.range_search(bits, limit + 1)  # strictly below the radius
        rows = np.repeat(np.arange(len(bits)), np.diff(lims.astype(np.int64)))
        phash[str(limit)] = removal_scores(_components(len(bits), rows, ids), true_root)
    best = max(
        phash,
        key=lambda k: (
            2
            * phash[k]["precision"]
            * phash[k]["recall"]
            / max(phash[k]["precision"] + phash[k]["recall"], 1e-9)
        ),
    )
    return {
        "copies_precision": sieve["precision"],
        "copies_recall": sieve["recall"],
        "copies": {
            "sieve": {
                **sieve,
                "recall_by_transform": per_transform,
                "seconds": round(seconds, 1),
                "candidate_pairs": report["copies"]["candidate_pairs"],
                "verified_pairs": report["copies"]["verified_pairs"],
            },
            "clip_back_cosine_0.94": clip_back,
            "phash_by_max_distance": phash,
            "phash_best_distance": int(best),
            "data": {
                "samples": len(meta),
                "planted": int((true_root != np.arange(len(meta))).sum()),
                "object_sizes": "small,medium",
                "noise_texture": "coarse",
            },
        },
    }


def _semantic_seconds(n: int, dim: int, seed: int = 0) -> float:
    x = np.empty((n, dim), np.float16)
    for lo in range(
        0, n, 1 << 17
    ):  # generated in slices: float32 of the whole would double the memory
        hi = min(n, lo + (1 << 17))
        x[lo:hi] = clustered_vectors(hi - lo, dim, n_clusters=10_000, seed=seed + lo).astype(
            np.float16
        )
    vectors, ranks, params = ArrayVectors(x), np.arange(n), SemanticParams()
    t = time.perf_counter()
    for g in root_groups(vectors, np.arange(n), params):
        group_links(vectors, g, ranks[g], params)
    return time.perf_counter() - t


def run_semantic(
    work: str,
    n: int = 20_000,
    copy_fraction: float = 0.05,
    workers: int | None = None,
    sizes: tuple[int, ...] = (100_000, 1_000_000),
    dim: int = 512,
) -> dict[str, Any]:
    collection = data(work, n, copy_fraction, workers)
    store = EmbeddingStore.open(collection, S.MODALITY_IMAGE)
    params = SemanticParams()
    ids = np.arange(store.count)
    sims = np.concatenate(
        [group_links(store, g, ids[g], params)[1] for g in root_groups(store, ids, params)]
    )
    fractions = {f"{e:g}": round(float((sims > 1 - e).mean()), 4) for e in EPS_TABLE}
    seconds = {str(s): round(_semantic_seconds(s, dim), 2) for s in sizes}
    out: dict[str, Any] = {
        "semantic_removed_fraction": fractions,
        "semantic_seconds": seconds,
        "semantic_setup": {
            "dim": dim,
            "vectors": "bench.synthetic.clustered_vectors, 10k centres",
            "params": vars(params),
            "in_process": True,
        },
    }
    if len(sizes) >= 2:
        out["semantic_cost_ratio_1m_vs_100k"] = round(
            seconds[str(sizes[-1])] / seconds[str(sizes[0])], 2
        )
        out["semantic_sizes_ratio"] = sizes[-1] / sizes[0]
    return out


def _truth_mask(meta: Any, rule: str) -> np.ndarray:
    if rule == "watermark":
        return meta["watermark"].astype(bool).to_numpy()
    column, value = [s.strip() for s in rule.split("==")]
    return (meta[column] == value.strip("'")).to_numpy()


def run_concepts(
    work: str,
    n: int = 20_000,
    copy_fraction: float = 0.05,
    workers: int | None = None,
    draws: int = 5,
) -> dict[str, Any]:
    collection = data(work, n, copy_fraction, workers)
    meta = read_metadata(collection).to_pandas()
    keys = meta[S.KEY].to_numpy()
    img = np.concatenate(
        [a for _, a in EmbeddingStore.open(collection, S.MODALITY_IMAGE).iter_parts()]
    )
    txt = np.concatenate(
        [a for _, a in EmbeddingStore.open(collection, S.MODALITY_TEXT).iter_parts()]
    )
    clip = load_clip("sieve-tiny", device="cpu")
    results: dict[str, dict[str, list[float]]] = {
        m: {} for m in ("zero_shot", "lilac", "lilac_image", "sieve")
    }
    for name, (prompt, rule) in CONCEPTS.items():
        truth = _truth_mask(meta, rule)
        t = clip.encode_texts([prompt])[0]
        for draw in range(draws):
            rng = np.random.default_rng(draw)
            pos = rng.choice(np.nonzero(truth)[0], 10, replace=False)
            neg = rng.choice(np.nonzero(~truth)[0], 10, replace=False)
            labelled = np.concatenate([pos, neg])
            y = np.r_[np.ones(10), np.zeros(10)]
            rest = np.setdiff1d(np.arange(len(truth)), labelled)

            def auroc(
                scores: np.ndarray, truth: np.ndarray = truth, rest: np.ndarray = rest
            ) -> float:
                return float(roc_auc_score(truth[rest], scores[rest]))

            results["zero_shot"].setdefault(name, []).append(auroc(img @ t))
            for method, x in (("lilac", txt), ("lilac_image", img)):
                model = LogisticRegression(class_weight="balanced", max_iter=5000).fit(
                    x[labelled], y
                )
                results[method].setdefault(name, []).append(auroc(x @ model.coef_[0]))
            concept = fit_concept(
                collection,
                f"bench-{name}",
                list(keys[pos]),
                list(keys[neg]),
                prompt=prompt,
                clip=clip,
                seed=draw,
            )
            results["sieve"].setdefault(name, []).append(
                auroc(score_collection(collection, concept))
            )
        log.info("%s: %s", name, {m: round(float(np.mean(r[name])), 3) for m, r in results.items()})
    means = {m: {c: round(float(np.mean(v)), 4) for c, v in r.items()} for m, r in results.items()}
    return {
        "concept_auroc_20_labels": {
            **means,
            "draws": draws,
            "labels": "10 positive + 10 negative",
            "prompts": {c: p for c, (p, _) in CONCEPTS.items()},
            "per_draw": {
                m: {c: [round(v, 4) for v in vs] for c, vs in r.items()} for m, r in results.items()
            },
        }
    }


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    fn()  # warm: page cache, thread pool
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs), runs


def run_score(
    work: str, n: int = 10_000_000, dim: int = 128, parts: int = 10, repeats: int = 3
) -> dict[str, Any]:
    folder = os.path.join(work, f"score-{n}x{dim}")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays: dict[str, list[np.ndarray]] = {}
    for m in ("img", "txt"):
        arrays[m] = []
        for p in range(parts):
            path = os.path.join(folder, f"{m}_{p}.npy")
            rows = n // parts + (p < n % parts)
            if not os.path.exists(path):
                tmp = path + ".tmp.npy"
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(rows, dim))
                for lo in range(0, rows, 1 << 18):
                    hi = min(rows, lo + (1 << 18))
                    out[lo:hi] = clustered_vectors(hi - lo, dim, seed=p * 1000 + lo).astype(
                        np.float16
                    )
                out.flush()
                del out
                os.replace(tmp, path)
            arrays[m].append(np.load(path, mmap_mode="r"))
    concept = Concept(
        "bench",
        [],
        [],
        image_weights=list(rng.standard_normal(dim)),
        text_weights=list(rng.standard_normal(dim)),
        bias=0.1,
    )
    median, runs = _timed(lambda: score_vectors(concept, arrays["img"], arrays["txt"]), repeats)
    key = "concept_score_10m_seconds" if n == 10_000_000 else f"concept_score_{n}_seconds"
    return {
        key: round(median, 3),
        "concept_score": {
            "samples": n,
            "dim": dim,
            "modalities": 2,
            "vectors_read": 2 * n,
            "threads": cores(),
            "runs": [round(r, 3) for r in runs],
        },
    }


def run_map(work: str, n: int = 100_000, dim: int = 512) -> dict[str, Any]:
    folder = os.path.join(work, f"map-{n}x{dim}")
    if not os.path.exists(S.CollectionLayout(folder).collection_json):
        parts = max(1, n // 20_000)
        img, txt = clip_like_pairs(n, dim, seed=0)
        write_collection(folder, np.array_split(img, parts), np.array_split(txt, parts))
    t = time.perf_counter()
    report = compute_map(folder, sample=n)
    seconds = time.perf_counter() - t
    key = "map_100k_seconds" if n == 100_000 else f"map_{n}_seconds"
    return {
        key: round(seconds, 1),
        "map": {
            "samples": n,
            "dim": dim,
            "layout_seconds": report["layout_seconds"],
            "note": "includes numba's compile on a fresh process",
        },
    }


PARTS = ("copies", "semantic", "concepts", "search_concepts", "score", "map")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.insight",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--only", default=",".join(PARTS), help=f"comma list of parts: {','.join(PARTS)}"
    )
    p.add_argument(
        "--work",
        default=os.path.join(tempfile.gettempdir(), "sieve-bench-insight"),
        help="folder for generated data (reused between runs)",
    )
    p.add_argument(
        "--n", type=int, default=20_000, help="generated samples (copies, semantic, concepts)"
    )
    p.add_argument("--copy-fraction", type=float, default=0.05, help="planted copies")
    p.add_argument(
        "--workers", type=int, default=None, help="Dask workers for embed and dedup (0: in process)"
    )
    p.add_argument(
        "--semantic-sizes", default="100000,1000000", help="semantic timing sizes, comma list"
    )
    p.add_argument("--semantic-dim", type=int, default=512)
    p.add_argument("--draws", type=int, default=5, help="concepts: random draws of the 20 labels")
    p.add_argument("--score-n", type=int, default=10_000_000, help="score: vectors per modality")
    p.add_argument("--score-dim", type=int, default=128, help="score: dim (sieve-tiny's)")
    p.add_argument("--repeats", type=int, default=3, help="score: timed runs (median)")
    p.add_argument("--map-n", type=int, default=100_000)
    p.add_argument("--map-dim", type=int, default=512)
    a = p.parse_args(argv)
    setup_logging()
    parts = [x.strip() for x in a.only.split(",") if x.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"--only: unknown parts {unknown}; expected {list(PARTS)}")
    os.makedirs(a.work, exist_ok=True)
    runs: dict[str, Callable[[], dict[str, Any]]] = {
        "copies": lambda: run_copies(a.work, a.n, a.copy_fraction, a.workers),
        "semantic": lambda: run_semantic(
            a.work,
            a.n,
            a.copy_fraction,
            a.workers,
            tuple(int(s) for s in a.semantic_sizes.split(",")),
            a.semantic_dim,
        ),
        "concepts": lambda: run_concepts(a.work, a.n, a.copy_fraction, a.workers, a.draws),
        "search_concepts": lambda: run_search_concepts(
            data(a.work, a.n, a.copy_fraction, a.workers)
        ),
        "score": lambda: run_score(a.work, a.score_n, a.score_dim, repeats=a.repeats),
        "map": lambda: run_map(a.work, a.map_n, a.map_dim),
    }
    for part in parts:
        log.info("part %s", part)
        payload = runs[part]()
        path = write_results("insight", payload, merge=True)
        log.info(
            "%s -> %s: %s",
            part,
            path,
            {k: v for k, v in payload.items() if not isinstance(v, dict)},
        )


if __name__ == "__main__":
    main()
