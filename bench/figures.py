"""The README's table of measured figures, rendered from bench/results so prose never drifts.

`python -m bench.figures` prints the table; `--write` replaces the block between the
FIGURES markers in README.md. tests/test_readme.py fails when the README's block differs
from what the results files say, so a re-run benchmark is one `--write` away from the README.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- FIGURES:START (python -m bench.figures --write) -->", "<!-- FIGURES:END -->"

#: (what, results file, dotted key, format, goal or comparison) per row
FIGURES: list[tuple[str, str, str, str, str]] = [
    ("sieve-tiny zero-shot colour accuracy", "clip_tiny.json", "color_acc", "{:.3f}", "goal 0.9"),
    ("sieve-tiny zero-shot shape accuracy", "clip_tiny.json", "shape_acc", "{:.3f}", "goal 0.9"),
    ("sieve-tiny text→image recall@10", "clip_tiny.json", "t2i_recall_at_10", "{:.3f}", "goal 0.8"),
    (
        "embed job / bare forward, 2 CPU cores",
        "embed.json",
        "scale.pipeline_vs_bare_ratio",
        "{:.3f}",
        "goal ≥ 0.8",
    ),
    (
        "embed cost per sample, spread vs median (1k–100k)",
        "embed.json",
        "scale.cost_spread_vs_median",
        "{:.3f}",
        "goal ≤ 0.15",
    ),
    (
        "ViT-B-32 best setting vs bare fp32 forward (CPU)",
        "embed.json",
        "vitb32.speedup_vs_fp32_bare",
        "{:.2f}x",
        "int8 + trimmed text",
    ),
    (
        "ViT-B-32 int8 cosine to fp32 (text)",
        "embed.json",
        "vitb32.cosine_vs_fp32",
        "{:.4f}",
        "goal ≥ 0.995",
    ),
    (
        "ViT-B-32 embed job / bare fp32 forward, H200",
        "embed_gpu.json",
        "vitb32_pipeline_fp32_vs_bare_fp32",
        "{:.2f}",
        "4 workers sharing the GPU",
    ),
    (
        "reader cost / model cost per sample, one core",
        "embed_stages.json",
        "reader_over_model",
        "{:.3f}",
        "tar + decode + phash + normalise + tokenize",
    ),
    (
        "watermark detector AUROC, held-out overlays",
        "watermark.json",
        "auroc",
        "{:.3f}",
        "goal 0.95",
    ),
    (
        "index recall@10, 1M × 512 CLIP-shaped vectors",
        "index.json",
        "chosen.recall_at_10",
        "{:.3f}",
        "IVF-PQ + exact re-rank",
    ),
    ("index size / flat size", "index.json", "chosen.memory_ratio_vs_flat", "{:.3f}", "budget 0.1"),
    ("index p99 query latency, ms", "index.json", "chosen.p99_ms", "{:.2f}", "budget 10"),
    (
        "server queries/s, sieve-tiny, one core, no cache",
        "index.json",
        "server.no_cache.qps",
        "{:.0f}",
        "",
    ),
    (
        "server / sequential loop, ViT-B-32, one core",
        "index.json",
        "server_vitb32.speedup",
        "{:.0f}x",
        "with its cache",
    ),
    (
        "HDiT cost exponent in pixels (fwd+bwd, 64²–512²)",
        "hdit.json",
        "hdit_exponent",
        "{:.3f}",
        "1 = linear; global-attention baseline below",
    ),
    ("global-attention baseline exponent", "hdit.json", "baseline_exponent", "{:.3f}", ""),
    (
        "HDiT demo: prompt colour match",
        "hdit.json",
        "prompt_color_match",
        "{:.3f}",
        "held-out seeds",
    ),
    (
        "SQL: LAION filter + GROUP BY over 10M rows, trusted, s",
        "curation.json",
        "sql_10m_seconds",
        "{:.3f}",
        "goal ≤ 1",
    ),
    (
        "SQL: the same query in the untrusted sandbox, s",
        "curation.json",
        "sql_10m_untrusted_seconds",
        "{:.3f}",
        "",
    ),
    (
        "export from s3: bytes read from source shards / member bytes",
        "storage.json",
        "export_bytes_fetched_ratio",
        "{:.3f}",
        "goal ≤ 1.2",
    ),
    (
        "embed on s3 / local, 2,000 samples",
        "storage.json",
        "stages.embed.s3_over_local",
        "{:.2f}",
        "moto on loopback",
    ),
    (
        "semantic dedup on s3 / local",
        "storage.json",
        "stages.dedup_semantic.s3_over_local",
        "{:.2f}",
        "",
    ),
    (
        "attacks held (SQL, files, network, takedown, UI paths, server)",
        "security.json",
        "held_fraction",
        "{:.3f}",
        "goal 1",
    ),
    (
        "untrusted SQL: second user's p99 beside a hostile query, ms",
        "security.json",
        "second_user_p99_ms",
        "{:.0f}",
        "goal ≤ 1000",
    ),
    (
        "similarity filter: swapped captions removed",
        "curation.json",
        "filter_mismatch_removed",
        "{:.3f}",
        "goal ≥ 0.95",
    ),
    (
        "similarity filter: matched pairs kept",
        "curation.json",
        "filter_match_kept",
        "{:.3f}",
        "goal ≥ 0.9",
    ),
    (
        "export / plain copy of the source tars (64 px samples)",
        "curation.json",
        "export_vs_tar_copy_ratio",
        "{:.3f}",
        "goal ≥ 0.5",
    ),
    (
        "copies found: precision, 20k samples, 5% planted",
        "insight.json",
        "copies_precision",
        "{:.3f}",
        "goal ≥ 0.95",
    ),
    ("copies found: recall", "insight.json", "copies_recall", "{:.3f}", "goal ≥ 0.95"),
    (
        "SemDeDup time, 1M / 100k vectors",
        "insight.json",
        "semantic_cost_ratio_1m_vs_100k",
        "{:.2f}",
        "goal ≤ 12",
    ),
    (
        "concept AUROC from 20 labels: 'star'",
        "insight.json",
        "concept_auroc_20_labels.sieve.star",
        "{:.3f}",
        "zero-shot and Lilac's recipe in the json",
    ),
    (
        "concept AUROC: 'on a noisy background'",
        "insight.json",
        "concept_auroc_20_labels.sieve.noisy_background",
        "{:.3f}",
        "captions rarely name it",
    ),
    (
        "concept AUROC: 'watermarked'",
        "insight.json",
        "concept_auroc_20_labels.sieve.watermarked",
        "{:.3f}",
        "captions never name it",
    ),
    (
        "concept scoring of 10M float16 vectors, s",
        "insight.json",
        "concept_score_10m_seconds",
        "{:.2f}",
        "goal ≤ 5",
    ),
    (
        "embedding map (UMAP) of 100k embeddings, s",
        "insight.json",
        "map_100k_seconds",
        "{:.0f}",
        "numba's compile included",
    ),
    (
        "web UI: warm search rerun, demo collection, ms",
        "webui.json",
        "search_rerun_ms",
        "{:.0f}",
        "goal ≤ 300",
    ),
    (
        "web UI: warm search rerun, 1M rows, ms",
        "webui.json",
        "search_rerun_ms_1m",
        "{:.0f}",
        "goal ≤ 500",
    ),
    (
        "web UI: app process memory with 1M rows open, MB",
        "webui.json",
        "rss_mb_1m",
        "{:.0f}",
        "goal ≤ 1000",
    ),
    (
        "web UI: a label key to the next label accepted, in the browser, ms",
        "webui.json",
        "label_click_ms",
        "{:.0f}",
        "goal ≤ 150; saved by Python: `label_saved_ms`",
    ),
    (
        "web UI: results wholly in one 1,400 × 900 screen",
        "webui.json",
        "results_per_screen",
        "{:.0f}",
        "8 a row",
    ),
    (
        "web UI: app process peak memory over a session (search to export), 1M rows, MB",
        "webui.json",
        "rss_mb_1m_peak",
        "{:.0f}",
        "goal ≤ 1500",
    ),
    (
        "web UI: process start to first page, s",
        "webui.json",
        "first_page_s",
        "{:.1f}",
        "real browser",
    ),
    (
        "CLIP guidance win rate vs unguided: vqgan",
        "guidance.json",
        "win_rate_vs_unguided.vqgan",
        "{:.2f}",
        "goal ≥ 0.9; independent judge",
    ),
    (
        "CLIP guidance win rate vs unguided: pixels",
        "guidance.json",
        "win_rate_vs_unguided.pixels",
        "{:.2f}",
        "goal ≥ 0.9",
    ),
    (
        "CLIP guidance win rate vs unguided: hdit",
        "guidance.json",
        "win_rate_vs_unguided.hdit",
        "{:.2f}",
        "goal ≥ 0.9",
    ),
    (
        "CLIP guidance win rate vs a random prompt: vqgan",
        "guidance.json",
        "win_rate_vs_random_prompt.vqgan",
        "{:.2f}",
        "goal ≥ 0.9",
    ),
    (
        "CLIP guidance win rate vs a random prompt: pixels",
        "guidance.json",
        "win_rate_vs_random_prompt.pixels",
        "{:.2f}",
        "goal ≥ 0.9",
    ),
    (
        "CLIP guidance win rate vs a random prompt: hdit",
        "guidance.json",
        "win_rate_vs_random_prompt.hdit",
        "{:.2f}",
        "goal ≥ 0.9",
    ),
    (
        "demo HDiT samples that copy a training image",
        "guidance.json",
        "audit_copy_fraction",
        "{:.3f}",
        "the duplicates' copy rule",
    ),
]


def lookup(doc: dict[str, Any], dotted: str) -> Any:
    """doc["a"]["b"] for "a.b" (KeyError naming the missing part)."""
    value: Any = doc
    for part in dotted.split("."):
        value = value[part]
    return value


def render(results: Path = RESULTS_DIR) -> str:
    """The markdown table of FIGURES, each read from its results file."""
    rows = ["| figure | value | note | source |", "|---|---|---|---|"]
    cache: dict[str, dict[str, Any]] = {}
    for what, name, key, fmt, note in FIGURES:
        doc = cache.setdefault(name, json.loads((results / name).read_text()))
        rows.append(f"| {what} | {fmt.format(lookup(doc, key))} | {note} | `{name}` `{key}` |")
    return "\n".join(rows)


def block(readme: str) -> str:
    """The text between the markers (KeyError when the README lost them)."""
    if START not in readme or END not in readme:
        raise KeyError(f"README.md lacks the figure markers {START!r} ... {END!r}")
    return readme.split(START, 1)[1].split(END, 1)[0].strip()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.figures",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--write", action="store_true", help="replace the README's figure block")
    a = p.parse_args(argv)
    table = render()
    if not a.write:
        print(table)
        return
    text = README.read_text()
    old = block(text)
    README.write_text(
        text.replace(old, table, 1) if old else text.replace(START, f"{START}\n{table}", 1)
    )
    print(f"README.md figures {'unchanged' if old == table else 'updated'}")


if __name__ == "__main__":
    main()
