"""docs/scale.md's tables, rendered from bench/results so the page never drifts from the runs.

`python -m bench.scale_doc` prints the two blocks (measured figures, projection to LAION-5B);
`--write` replaces them between their markers in docs/scale.md. The projection is arithmetic
on the measured slopes and the cluster described by CLUSTER, nothing else: a stage measured at
one size only is projected from that size's cost per row (startup included, so an upper bound),
and said so.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR
from bench.figures import lookup
from bench.scale import DRIVER_GOAL_MB, RATIO_GOAL, STAGES

DOC = Path(__file__).resolve().parent.parent / "docs" / "scale.md"
MEASURED = (
    "<!-- SCALE-MEASURED:START (python -m bench.scale_doc --write) -->",
    "<!-- SCALE-MEASURED:END -->",
)
PROJECTED = (
    "<!-- SCALE-PROJECTION:START (python -m bench.scale_doc --write) -->",
    "<!-- SCALE-PROJECTION:END -->",
)
#: LAION-5B's rows
TARGET_ROWS = 5_850_000_000
#: the cluster the projection assumes: CPU machines for curation, GPUs for the embed job
CLUSTER = {"machines": 16, "cores": 64, "memory_gb": 256, "gpus": 32}
#: what a stage's driver does and what its Dask tasks do, at 5.85B rows
WHERE = {
    "index_build": "train on a sample (driver); add part by part (one task per part); merge",
    "sql": "DuckDB over the parquet parts in one process (it streams)",
    "stats": "one task per part (`--workers`/`--scheduler`); driver merges per-part counts",
    "subset_resolve": "driver: SQL ids, kNN clauses on the index, the resolved ids in memory",
    "export": "driver: resolved ids (8 B a row); one task per output shard reads its own rows",
    "concept": "driver: fit on the examples; scoring memory-maps each part",
    "uniqueness": "lists of ~256 rows (driver: a k-means on a sample); one task per part "
    "assigns rows to lists, one per group of lists compares each row with 4 lists' rows",
    "dedup_semantic": "k-means on a sample (driver); one task per cluster group",
    "map": "UMAP on a 100k sample (driver); one task per part places its rows (IVF lists)",
}
LABELS = {
    "index_build": "index build (`indices.build`)",
    "sql": "SQL group-by (`curation.sql`)",
    "stats": "stats, 2 workers (`curation.stats`)",
    "subset_resolve": "subset resolve (`curation.subset`)",
    "export": "export, urls, 2 workers (`curation.export`)",
    "concept": "concept fit + score (`curation.concept`)",
    "uniqueness": "uniqueness (`curation.uniqueness`)",
    "dedup_semantic": "dedup semantic, 2 workers (`curation.dedup`)",
    "map": "map (`curation.map`)",
}
SIZES = ("100k", "1m", "10m")
#: drivers whose memory a setting bounds, not the rows: a slope between two sizes would
#: extrapolate the setting's steps (the index's list count doubling with the rows)
BOUNDED = {
    "index_build": "the training sample, at most a quarter of `--max-index-memory` "
    "(`indices.select`)",
}
#: a driver whose peak grew by less than this fraction of itself over the measured sizes is
#: flat: at these sizes a Python process's peak moves that much with imports and allocator
#: noise alone, and a linear extrapolation of noise to 5.85B rows would mean nothing
FLAT = 0.25
ROWS = {"100k": 100_000, "1m": 1_000_000, "10m": 10_000_000}


def _load(name: str, results: Path) -> dict[str, Any]:
    path = results / name
    return json.loads(path.read_text()) if path.exists() else {}


def _cell(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "not measured"
    if "skipped" in entry:
        ready = ".READY does not exist" in entry["skipped"]
        return "not measured (the collection was not ready)" if ready else "not measured"
    if "failed" in entry:
        text = entry["failed"].strip()
        if text.startswith("exit -9") or text.startswith("killed"):
            return f"killed after {entry.get('seconds', 0):,.0f} s, unfinished"
        why = text.splitlines()[-1][:60] if text else ""
        return f"failed after {entry.get('seconds', 0):,.0f} s ({why.replace('|', '/')})"
    out = f"{entry['seconds']:,.1f} s"
    if entry.get("cpu_seconds"):
        out += f" (CPU {entry['cpu_seconds']:,.0f} s)"
    if entry.get("driver_peak_rss_mb") is not None:
        out += f" · driver {entry['driver_peak_rss_mb']:,.0f} MB"
        if entry.get("driver_peak_anon_mb"):  # the rest of the RSS is mapped embedding pages
            out += f" ({entry['driver_peak_anon_mb']:,.0f} MB anonymous)"
    if entry.get("worker_peak_rss_mb"):
        out += f" · worker {entry['worker_peak_rss_mb']:,.0f} MB"
    if entry.get("source"):
        out += f" ({entry['source']})"
    return out


def _ok(entry: dict[str, Any] | None) -> bool:
    return bool(entry) and "seconds" in entry and "failed" not in entry and "skipped" not in entry


def _fmt(value: Any, spec: str) -> str:
    return "not measured" if value is None else spec.format(value)


def measured(results: Path = RESULTS_DIR) -> str:
    """The measured block: the curation stages from scale.json, the other stages from their own
    benchmarks' files."""
    scale = _load("scale.json", results)
    ratios = scale.get("cost_ratio_10m_vs_1m", {})
    basis = scale.get("cost_ratio_basis", {})
    within = scale.get("driver_peak_within_4000mb", {})
    lines = [
        "| stage | 100k rows | 1M rows | 10M rows | 10M / 1M cost "
        f"(goal ≤ {RATIO_GOAL:g}) | driver ≤ {DRIVER_GOAL_MB:,.0f} MB |",
        "|---|---|---|---|---|---|",
    ]
    for stage in STAGES:
        cells = [_cell(scale.get(size, {}).get(stage)) for size in SIZES]
        kind = "CPU" if basis.get(stage) == "cpu_seconds" else "wall"
        ratio = f"{ratios[stage]:.1f} ({kind})" if stage in ratios else "not measured"
        ok = {True: "yes", False: "**no**"}.get(within.get(stage), "not measured")
        lines.append(f"| {LABELS[stage]} | " + " | ".join(cells) + f" | {ratio} | {ok} |")
    embed, gpu = _load("embed.json", results), _load("embed_gpu.json", results)
    curation, webui = _load("curation.json", results), _load("webui.json", results)
    rate = lookup(embed, "scale.samples_per_s.100000") if embed else None
    gpu_rate = lookup(gpu, "pipeline_steady_samples_per_s.vitb32_bf16_w4") if gpu else None
    sql10 = curation.get("sql_10m_seconds")
    sql_rss = curation.get("sql_10m_catalog_rss_mb")
    ui = webui.get("1m", {})
    lines += [
        "",
        "Stages measured by their own benchmarks (file and key in brackets):",
        "",
        "| stage | figure | sizes not measured |",
        "|---|---|---|",
        f"| embed, sieve-tiny, 2 CPU cores | {_fmt(rate, '{:,.0f}')} samples/s at 100k "
        "[embed.json scale.samples_per_s] | 1M, 10M |",
        f"| embed, ViT-B-32 bf16, one H200, 4 workers | {_fmt(gpu_rate, '{:,.0f}')} samples/s "
        "[embed_gpu.json pipeline_steady_samples_per_s] | all sizes as a curve |",
        f"| SQL, 10M rows, trusted | {_fmt(sql10, '{:.2f}')} s, catalog "
        f"{_fmt(sql_rss, '{:,.0f}')} MB [curation.json sql_10m_*] | 100k |",
        f"| web UI search rerun, 1M rows | {_fmt(ui.get('rerun_ms'), '{:,.0f}')} ms "
        "[webui.json 1m] | 100k, 10M |",
        f"| web UI memory, 1M rows, CLIP in its encoder process | idle "
        f"{_fmt(webui.get('rss_mb_1m'), '{:,.0f}')} MB, peak over a scripted session "
        f"{_fmt(webui.get('rss_mb_1m_peak'), '{:,.0f}')} MB [webui.json rss_mb_1m*] | 100k |",
        "| web UI click to result, 10M rows | "
        + ", ".join(
            f"{k.replace('_', ' ')} {v:.1f} s"
            for k, v in webui.get("action_s_10m", {}).items()
            if isinstance(v, (int, float))
        )
        + " [webui.json action_s_10m] | 100k |",
    ]
    copies = scale.get("copies")
    if isinstance(copies, dict):
        p, r = copies.get("copies_precision"), copies.get("copies_recall")
        lines.append(
            f"| dedup copies, generated pictures | precision {_fmt(p, '{:.3f}')}, recall "
            f"{_fmt(r, '{:.3f}')} [scale.json copies] | see its entry |"
        )
    return "\n".join(lines)


def _core_seconds(entry: dict[str, Any], cores: int) -> float:
    """CPU seconds of the command and its workers where measured, else wall seconds x cores."""
    return entry.get("cpu_seconds") or entry["seconds"] * cores


def _slope(stage_doc: dict[str, dict[str, Any]], cores: int) -> tuple[float, str] | None:
    """(core-seconds per row, basis) from the two largest sizes measured, else the one size's
    cost per row (startup included)."""
    have = [s for s in SIZES if _ok(stage_doc.get(s))]
    if not have:
        return None
    if len(have) == 1:
        e = stage_doc[have[0]]
        kind = "CPU" if e.get("cpu_seconds") else f"wall × {cores}"
        return _core_seconds(e, cores) / e["rows"], f"{have[0]} only, {kind} (upper bound)"
    a, b = stage_doc[have[-2]], stage_doc[have[-1]]
    if bool(a.get("cpu_seconds")) != bool(b.get("cpu_seconds")):
        a, b = ({**e, "cpu_seconds": None} for e in (a, b))  # one basis for both ends
    kind = "CPU" if a.get("cpu_seconds") else f"wall × {cores}"
    rows = b["rows"] - a["rows"]
    seconds = max(_core_seconds(b, cores) - _core_seconds(a, cores), 0.0) / rows
    return seconds, f"slope {have[-2]}→{have[-1]}, {kind}"


def _driver(stage_doc: dict[str, dict[str, Any]]) -> str:
    """The driver's memory at 5.85B rows, from the two largest sizes measured: the anonymous peak
    where one is recorded (the RSS also counts the touched pages of memory-mapped embeddings,
    page cache the kernel reclaims), else the RSS peak."""
    have = [stage_doc[s] for s in SIZES if _ok(stage_doc.get(s))]
    anon = [e for e in have if e.get("driver_peak_anon_mb")]
    key, what = ("driver_peak_anon_mb", " anonymous") if anon else ("driver_peak_rss_mb", "")
    basis = [e for e in (anon or have) if e.get(key) is not None]
    if not basis:
        return "not measured"
    b = basis[-1]
    if len(basis) == 1:
        at = f"{b[key] / 1024:,.1f} GB{what} at {b['rows']:,} rows; " if anon else ""
        return f"{at}one size: growth unknown"
    a = basis[-2]
    per_row = max(b[key] - a[key], 0.0) / (b["rows"] - a["rows"])
    if per_row * b["rows"] < FLAT * b[key]:
        return f"flat: {b[key] / 1024:,.1f} GB{what}"
    mb = b[key] + per_row * (TARGET_ROWS - b["rows"])
    return f"**{mb / 1024:,.0f} GB**{what} (grows {per_row * 1e6:,.0f} MB per 1M rows)"


def projection(results: Path = RESULTS_DIR) -> str:
    """The projection block: per stage, hours on CLUSTER and the driver's memory at 5.85B rows;
    then storage."""
    scale = _load("scale.json", results)
    cores_here = 2
    for run in scale.get("runs", []):
        cores_here = run.get("environment", {}).get("cores_used") or cores_here
    cores = CLUSTER["machines"] * CLUSTER["cores"]
    lines = [
        f"Cluster assumed: {CLUSTER['machines']} machines × {CLUSTER['cores']} cores × "
        f"{CLUSTER['memory_gb']} GB ({CLUSTER['memory_gb'] // CLUSTER['cores']} GB per "
        f"one-thread worker), {CLUSTER['gpus']} GPUs for the embed job. Core-hours = measured "
        f"CPU seconds per row (the command's and its workers'; wall seconds × {cores_here} "
        f"cores where CPU time was not recorded) × {TARGET_ROWS:,} rows; hours = core-hours / "
        f"{cores:,} cores, which assumes the stage's tasks spread over every core. "
        "Driver at 5.85B: "
        "the driver's peak projected along its slope, from its anonymous memory "
        "(`driver_peak_anon_mb`) where recorded: its RSS also counts the touched pages of the "
        "memory-mapped embeddings, which are page cache the kernel reclaims and shares, not "
        "memory the driver holds; elsewhere from the RSS peak, an upper bound.",
        "",
        "| stage | basis | core-hours at 5.85B | hours on the cluster | driver at 5.85B "
        "| what runs where |",
        "|---|---|---|---|---|---|",
    ]
    for stage in STAGES:
        per_size = {s: scale.get(s, {}).get(stage) for s in SIZES}
        got = _slope({s: e for s, e in per_size.items() if e}, cores_here)
        if got is None:
            lines.append(f"| {LABELS[stage]} | not measured | — | — | — | {WHERE[stage]} |")
            continue
        per_row, basis = got
        core_h = per_row * TARGET_ROWS / 3600
        driver = _driver({s: e for s, e in per_size.items() if e})
        if stage in BOUNDED:
            driver = f"bounded by {BOUNDED[stage]}"
        lines.append(
            f"| {LABELS[stage]} | {basis} | {core_h:,.1f} | {core_h / cores:,.2f} | {driver} "
            f"| {WHERE[stage]} |"
        )
    gpu = _load("embed_gpu.json", results)
    gpu_rate = lookup(gpu, "pipeline_steady_samples_per_s.vitb32_bf16_w4") if gpu else None
    if gpu_rate:
        gpu_h = TARGET_ROWS / gpu_rate / 3600
        lines.append(
            f"| embed, ViT-B-32 bf16 | embed_gpu.json, one H200 | {gpu_h:,.0f} GPU-hours | "
            f"{gpu_h / CLUSTER['gpus']:,.1f} on {CLUSTER['gpus']} GPUs | per-shard tasks | "
            "one task per input shard on GPU workers; the driver lists shards |"
        )
    per_row = scale.get("storage_bytes_per_row", {})
    size = next((s for s in reversed(SIZES) if s in per_row), None)
    if size:
        lines += [
            "",
            f"Storage at 5.85B rows, from the bytes per row of the {size} collection "
            "[scale.json storage_bytes_per_row]:",
            "",
            "| folder | bytes per row | at 5.85B rows |",
            "|---|---|---|",
        ]
        total = 0.0
        rows, note = dict(per_row[size]), ""
        index = lookup(_load("index.json", results), "scale_10m") or {}
        if "indices" not in rows and index.get("ivfdata_bytes"):
            # the collection measured here had no index: the 10M build's own files
            built = index.get("index_bytes", 0) + index["ivfdata_bytes"]
            rows["indices"] = built / 10_000_000
            note = "indices/: the 10M build's index and lists [index.json scale_10m]"
        for name, b in rows.items():
            total += b * TARGET_ROWS
            lines.append(f"| {name}/ | {b:,.0f} | {b * TARGET_ROWS / 1e12:,.1f} TB |")
        lines.append(f"| all | | {total / 1e12:,.1f} TB |")
        lines += ["", note] if note else []
    return "\n".join(lines)


def _replace(text: str, markers: tuple[str, str], block: str) -> str:
    start, end = markers
    if start not in text or end not in text:
        raise KeyError(f"{DOC} lacks the markers {start!r} ... {end!r}")
    head, rest = text.split(start, 1)
    return head + start + "\n" + block + "\n" + end + rest.split(end, 1)[1]


def render_doc(text: str, results: Path = RESULTS_DIR) -> str:
    """`text` (docs/scale.md) with both blocks rendered from `results`."""
    text = _replace(text, MEASURED, measured(results))
    return _replace(text, PROJECTED, projection(results))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.scale_doc", description=__doc__)
    p.add_argument("--write", action="store_true", help="rewrite the blocks in docs/scale.md")
    a = p.parse_args(argv)
    if a.write:
        DOC.write_text(render_doc(DOC.read_text()))
    else:
        print(measured() + "\n\n" + projection())


if __name__ == "__main__":
    main()
