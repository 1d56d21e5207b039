"""`python -m bench.copy_verdict_pairs [--n 6000] [--seed 1]`: the copy verdict alone, on a fixed
pair set, in minutes: the development loop of `curation.copies`.

`bench.scale_copies` measures the copies level whole (candidates, picture reads, verdicts) and
takes about 25 minutes at 20k samples. This runs only the verdict (`curation.copies.is_copy`)
over the pairs that decide its precision and recall on generated pictures (the same generator
settings as `bench.insight.data`):

- every planted copy with its original (positives, by transform);
- the hard negatives: distinct pictures of the same kind on a flat or gradient ground (same
  background, ground colour and object size) whose pixels mostly agree (at least
  PREFILTER_AGREE of them within PREFILTER_LEVEL grey levels), which is where the verdict's
  false removals come from (one small shape moved, recoloured or added).

The pair set is made once under --work (pictures decoded to arrays, pairs as parquet) and reused.
Prints and writes (`--out`, JSON, with the command, cores and library versions) recall per
transform, false positives by kind (how the two scenes' descriptions differ), precision over the
pair set and the verdict's time per pair.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import logging
import os
import sys
import tarfile
import time
from collections import Counter
from typing import Any

import numpy as np
from PIL import Image

from bench.common import environment, library_versions
from curation.copies import is_copy
from models.runtime import setup_logging
from pipelines.generate import write_sample_dataset

log = logging.getLogger("bench.copy_verdict_pairs")

#: a negative pair is kept when at least this fraction of its pixels agree ...
PREFILTER_AGREE = 0.96
#: ... within this many levels (max over RGB), the frames resized to 64 px
PREFILTER_LEVEL = 30
#: scene attributes compared to name a negative pair's kind
ATTRS = ("shape", "color", "count", "size", "position", "background", "bg_color")


def _read_shards(shards: str) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """Decoded pictures and json of every sample of the shards, in key order."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(glob.glob(os.path.join(shards, "*.tar"))):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.rsplit(".", 1)
                fh = tar.extractfile(member)
                if fh is not None:
                    found.setdefault(key, {})[ext] = fh.read()
    keys = sorted(k for k in found if "jpg" in found[k] and "json" in found[k])
    pictures = [np.asarray(Image.open(io.BytesIO(found[k]["jpg"])).convert("RGB")) for k in keys]
    return pictures, [json.loads(found[k]["json"]) for k in keys]


def _small(a: np.ndarray) -> np.ndarray:
    if a.shape[:2] == (64, 64):
        return a.astype(np.int16)
    return np.asarray(Image.fromarray(a).resize((64, 64)), dtype=np.int16)


def make_pairs(work: str, n: int, seed: int) -> dict[str, Any]:
    """The pair set (made once under `work`): pictures, planted pairs and hard negatives."""
    cache = os.path.join(work, f"pairs-n{n}-s{seed}.npz")
    if os.path.exists(cache):
        z = np.load(cache, allow_pickle=True)
        return {k: z[k] for k in z.files}
    shards = os.path.join(work, f"shards-n{n}-s{seed}")
    if not glob.glob(os.path.join(shards, "*.tar")):
        write_sample_dataset(
            shards,
            n,
            seed=seed,
            watermark_fraction=0.1,
            shard_size=1000,
            object_sizes=["small", "medium"],
            near_duplicate_fraction=0.05,
            noise_texture="coarse",
        )
    pictures, docs = _read_shards(shards)
    keys = [d["key"] for d in docs]
    index = {k: i for i, k in enumerate(keys)}
    root = np.array([index[d["dup_of"]] if d.get("dup_of") else i for i, d in enumerate(docs)])
    copies = np.nonzero(root != np.arange(len(root)))[0]
    pos = np.stack([root[copies], copies], 1)
    small = np.stack([_small(p) for p in pictures])
    groups: dict[tuple, list[int]] = {}
    for i, d in enumerate(docs):
        if d["background"] in ("solid", "gradient"):
            groups.setdefault((d["background"], d["bg_color"], d["size"]), []).append(i)
    neg = []
    for members in groups.values():
        m = np.array(members)
        for a in range(len(m) - 1):
            agree = (np.abs(small[m[a + 1 :]] - small[m[a]]).max(-1) <= PREFILTER_LEVEL).mean(
                (1, 2)
            )
            for b in m[a + 1 :][agree >= PREFILTER_AGREE]:
                if root[m[a]] != root[b]:
                    neg.append((m[a], b))
    negs = np.array(neg, np.int64).reshape(-1, 2)
    kinds = np.array(
        ["+".join(k for k in ATTRS if docs[i][k] != docs[j][k]) or "same" for i, j in negs]
    )
    out = {
        "pictures": np.array(pictures + [None], dtype=object)[:-1],
        "positives": pos,
        "transforms": np.array([docs[c]["transform"] for c in copies]),
        "negatives": negs,
        "kinds": kinds,
    }
    np.savez(cache, **out)
    return out


def evaluate(pairs: dict[str, Any]) -> dict[str, Any]:
    """Recall per transform, false positives by kind and precision of `is_copy` over the set."""
    pictures = pairs["pictures"]
    t = time.perf_counter()
    hit = np.array([is_copy(pictures[a], pictures[b]) for a, b in pairs["positives"]], bool)
    false = np.array([is_copy(pictures[a], pictures[b]) for a, b in pairs["negatives"]], bool)
    seconds = time.perf_counter() - t
    transforms = pairs["transforms"]
    fp_kinds = Counter(str(k) for k in pairs["kinds"][false])
    return {
        "positives": len(hit),
        "negatives": len(false),
        "recall": round(float(hit.mean()), 4),
        "recall_by_transform": {
            str(t): round(float(hit[transforms == t].mean()), 4) for t in sorted(set(transforms))
        },
        "false_positives": int(false.sum()),
        "precision": round(float(hit.sum() / max(hit.sum() + false.sum(), 1)), 4),
        "false_positive_kinds": dict(fp_kinds.most_common()),
        "missed": [[int(a), int(b)] for a, b in pairs["positives"][~hit]],
        "false": [[int(a), int(b)] for a, b in pairs["negatives"][false]],
        "seconds": round(seconds, 1),
        "ms_per_pair": round(1000 * seconds / max(len(hit) + len(false), 1), 2),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.copy_verdict_pairs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--n", type=int, default=6000, help="generated samples")
    p.add_argument("--seed", type=int, default=1, help="generator seed")
    p.add_argument("--work", default="/work/bench_data/copy-verdict-pairs", help="pair set cache")
    p.add_argument("--out", default=None, help="write the figures here (JSON)")
    a = p.parse_args(argv)
    setup_logging()
    os.makedirs(a.work, exist_ok=True)
    pairs = make_pairs(a.work, a.n, a.seed)
    log.info("%d positives, %d negatives", len(pairs["positives"]), len(pairs["negatives"]))
    figures = evaluate(pairs)
    shown = {k: v for k, v in figures.items() if k not in ("missed", "false")}
    print(json.dumps(shown, indent=1))
    if a.out:
        figures["run"] = {
            "command": "python -m bench.copy_verdict_pairs " + " ".join(sys.argv[1:]),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "environment": environment(),
            "versions": library_versions(),
        }
        with open(a.out, "w") as fh:
            json.dump(figures, fh, indent=1)


if __name__ == "__main__":
    main()
