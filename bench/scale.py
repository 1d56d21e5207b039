"""`python -m bench.scale [--sizes 1000000,10000000] [--stages sql,stats,...]`: every curation
stage at 1M and 10M rows, as its own command, timed and memory-watched -> bench/results/scale.json.

Each stage's command runs in a subprocess on a synthetic collection (`synth1m`, `synth10m`
under --data, each usable once its `.READY` file exists) through a view of it: a folder of
links to its metadata, embeddings, markers and indices, so the stage's outputs (dedup/,
concepts/, uniqueness.parquet, map/) land beside the links and the collection itself is never
rewritten. `bench.scale_probe` samples the memory of the command (the driver) and of every
process under it (Dask workers). The index-build stage builds into a view without indices at
sizes up to 1M; at 10M it reads the indices benchmark's own run (bench/results/index.json,
key `scale_10m`) instead of building again.

Per size: {stage: {rows, seconds, driver_peak_rss_mb, worker_peak_rss_mb, ...}}; then
`cost_ratio_10m_vs_1m` per stage (goal <= 12: near-linear; CPU seconds of the command and its
workers where both sizes have them, as the cores are shared, else wall seconds: the basis is
in `cost_ratio_basis`) and `driver_peak_within_4000mb`.
Results merge stage by stage, so `--stages map` re-runs one stage alone, and the `copies` key
(`bench.scale_copies`) is kept.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from bench.common import RESULTS_DIR, write_results
from bench.scale_probe import watch
from collection import schema as S
from models.runtime import setup_logging

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
DATA = Path("/work/bench_data")
#: rows -> the synthetic collection's folder name under --data
COLLECTIONS = {100_000: "synth100k", 1_000_000: "synth1m", 10_000_000: "synth10m"}
#: the driver's memory goal at every size (issue 23)
DRIVER_GOAL_MB = 4000.0
#: how far the 10M cost may exceed 10x the 1M cost and still read as near-linear
RATIO_GOAL = 12.0
#: Dask workers a stage may start (the box has 2 cores)
WORKERS = 2
#: the subset every resolve and export stage takes: about half the rows
SPEC = {"name": "scale", "where": "clip_similarity > 0.3"}
SQL = "SELECT language, count(*) AS n, avg(clip_similarity) AS s FROM samples GROUP BY 1"
#: the concept's labelled examples: the first embedded keys of part 0
CONCEPT_EXAMPLES = 20
STAGES = (
    "index_build",
    "sql",
    "stats",
    "subset_resolve",
    "export",
    "concept",
    "uniqueness",
    "dedup_semantic",
    "map",
)


def label(rows: int) -> str:
    """1000000 -> '1m', 100000 -> '100k'."""
    return f"{rows // 1_000_000}m" if rows % 1_000_000 == 0 else f"{rows // 1000}k"


def make_view(source: Path, view: Path, with_indices: bool = True) -> Path:
    """A folder of links to `source`'s parts (and indices): where a stage writes its outputs."""
    view.mkdir(parents=True, exist_ok=True)
    names = ["metadata", "img_emb", "text_emb", "_done", "collection.json"]
    names += ["indices"] if with_indices else []
    for name in names:
        link = view / name
        if (source / name).exists() and not link.is_symlink():
            link.symlink_to(source / name)
    return view


def _concept_keys(collection: Path) -> tuple[list[str], list[str]]:
    table = pq.read_table(
        collection / "metadata" / "metadata_0.parquet", columns=[S.KEY, S.EMB_ROW]
    )
    keys = [
        k for k, e in zip(table[S.KEY].to_pylist(), table[S.EMB_ROW].to_pylist()) if e is not None
    ]
    half = CONCEPT_EXAMPLES // 2
    return keys[:half], keys[half:CONCEPT_EXAMPLES]


def _spec(work: Path) -> str:
    path = work / "scale.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in SPEC.items()))
    return str(path)


def command(stage: str, view: Path, work: Path) -> list[str]:
    """The stage's command line on the collection view `view` (scratch files under `work`)."""
    py, c = [sys.executable, "-m"], str(view)
    if stage == "index_build":
        # the image index on 2 local workers: what the indices benchmark builds at 10M
        return py + ["indices.build", c, "--modality", "image", "--workers", str(WORKERS)]
    if stage == "sql":
        return py + ["curation.sql", c, SQL, "--format", "json"]
    if stage == "stats":
        return py + ["curation.stats", c, "--format", "json", "--workers", str(WORKERS)]
    if stage == "subset_resolve":
        return py + ["curation.subset", c, _spec(work), "--out", str(work / "resolved.parquet")]
    if stage == "export":
        out = work / "export"
        return (
            py
            + ["curation.export", c, _spec(work), "--out", str(out), "--format", "urls"]
            + [
                "--workers",
                str(WORKERS),
                "--overwrite",
            ]
        )
    if stage == "concept":
        pos, neg = _concept_keys(view)
        return (
            py
            + ["curation.concept", c, "scale-probe", "--pos", ",".join(pos)]
            + [
                "--neg",
                ",".join(neg),
                "--modality",
                "image",
                "--no-columns",
            ]
        )
    if stage == "uniqueness":
        return py + ["curation.uniqueness", c]
    if stage == "dedup_semantic":
        return (
            py
            + ["curation.dedup", c, "--level", "semantic", "--workers", str(WORKERS)]
            + [
                "--run",
                "scale-semantic",
            ]
        )
    if stage == "map":
        return py + ["curation.map", c]
    raise ValueError(f"--stages: unknown stage {stage!r}; expected some of {', '.join(STAGES)}")


def _from_index_results(rows: int, path: Path) -> dict[str, Any] | None:
    """The 10M index build as the indices benchmark measured it (index.json `scale_10m`)."""
    doc = json.loads(path.read_text()) if path.exists() else {}
    found = doc.get("scale_10m")
    if not isinstance(found, dict):
        return None

    def first(*names: str) -> Any:
        for name in names:
            if isinstance(found.get(name), (int, float)):
                return found[name]
        return None

    return {
        "rows": first("rows", "n") or rows,
        "seconds": first("seconds", "build_seconds", "wall_s", "build_s"),
        "driver_peak_rss_mb": first("driver_peak_rss_mb", "peak_rss_mb", "rss_mb"),
        "worker_peak_rss_mb": first("worker_peak_rss_mb"),
        "driver_peak_anon_mb": first("driver_peak_anon_mb"),
        "worker_peak_anon_mb": first("worker_peak_anon_mb"),
        "source": "bench/results/index.json scale_10m",
    }


def storage_per_row(collection: Path, rows: int) -> dict[str, float]:
    """Bytes on disk per row of each of the collection's folders (metadata, embeddings,
    indices): what a projection of storage multiplies."""
    out = {}
    for name in ("metadata", "img_emb", "text_emb", "indices"):
        folder = collection / name
        if folder.is_dir():
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            out[name] = round(size / rows, 1)
    return out


def run_stage(
    stage: str,
    rows: int,
    data: Path,
    scratch: Path,
    deadline: float,
    index_results: Path = RESULTS_DIR / "index.json",
) -> dict[str, Any]:
    """One stage at one size: its figures, or why it has none."""
    source = data / COLLECTIONS[rows]
    if stage == "index_build" and rows > 1_000_000:
        got = _from_index_results(rows, index_results)
        return got or {"rows": rows, "skipped": "bench/results/index.json has no scale_10m yet"}
    left = deadline - dt.datetime.now(dt.timezone.utc).timestamp()
    if left < 30:
        return {"rows": rows, "skipped": "not run: the --deadline had passed"}
    view_name = f"{label(rows)}-{'build' if stage == 'index_build' else 'view'}"
    if stage == "index_build":  # from nothing: a rerun would reuse the parts a build left
        shutil.rmtree(scratch / view_name / "indices", ignore_errors=True)
    view = make_view(source, scratch / view_name, with_indices=stage != "index_build")
    work = Path(tempfile.mkdtemp(prefix=f"{stage}-", dir=scratch))
    cmd = command(stage, view, work)
    log.info("%s at %d rows: %s", stage, rows, " ".join(cmd[1:]))
    load_before = os.getloadavg()[0]
    got = watch(cmd, cwd=str(ROOT), timeout=left)
    entry: dict[str, Any] = {
        "rows": rows,
        "seconds": round(got.seconds, 2),
        "driver_peak_rss_mb": got.driver_peak_rss_mb,
        "driver_peak_anon_mb": got.driver_peak_anon_mb,
        "worker_peak_rss_mb": got.worker_peak_rss_mb,
        "cpu_seconds": got.cpu_seconds,
        "child_processes": got.workers_seen,
        "load_average_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "command": "python " + " ".join(cmd[1:]).replace(str(scratch), "$SCRATCH"),
    }
    if got.rc != 0:
        entry["failed"] = (
            "killed at the --deadline" if got.timed_out else f"exit {got.rc}: {got.tail[-600:]}"
        )
        log.warning("%s at %d rows failed: %s", stage, rows, entry["failed"])
    else:
        log.info(
            "%s at %d rows: %.1f s, driver %.0f MB",
            stage,
            rows,
            got.seconds,
            got.driver_peak_rss_mb,
        )
    return entry


def summary(doc: dict[str, Any]) -> dict[str, Any]:
    """cost_ratio_10m_vs_1m per stage and whether every measured driver stayed under the goal."""
    ratios, basis, wall, within = {}, {}, {}, {}
    small, big = doc.get("1m", {}), doc.get("10m", {})
    for stage in STAGES:
        a, b = small.get(stage, {}), big.get(stage, {})
        if a.get("seconds") and b.get("seconds") and "failed" not in a and "failed" not in b:
            wall[stage] = round(b["seconds"] / a["seconds"], 2)
            # CPU seconds where both runs have them: the cores are shared, wall time stretches
            measure = "cpu_seconds" if a.get("cpu_seconds") and b.get("cpu_seconds") else "seconds"
            ratios[stage] = round(b[measure] / a[measure], 2)
            basis[stage] = measure
        peaks = [
            doc[size][stage]["driver_peak_rss_mb"]
            for size in doc
            if isinstance(doc[size], dict)
            and isinstance(doc[size].get(stage), dict)
            and doc[size][stage].get("driver_peak_rss_mb") is not None
            and "failed" not in doc[size][stage]
        ]
        if peaks:
            within[stage] = max(peaks) <= DRIVER_GOAL_MB
    return {
        "cost_ratio_10m_vs_1m": ratios,
        "cost_ratio_basis": basis,
        "wall_ratio_10m_vs_1m": wall,
        "driver_peak_within_4000mb": within,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1000000,10000000", help="comma-separated row counts")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated, in run order")
    p.add_argument("--data", default=str(DATA), help="folder holding synth1m, synth10m, ...")
    p.add_argument("--scratch", default=str(DATA / "scale_work"), help="views and outputs")
    p.add_argument("--deadline", default=None, help="HH:MM UTC: stages still running are killed")
    p.add_argument(
        "--index-results",
        default=str(RESULTS_DIR / "index.json"),
        help="the indices benchmark's results file, whose scale_10m is the 10M index build",
    )
    a = p.parse_args(argv)
    setup_logging()
    sizes = [int(s) for s in a.sizes.split(",") if s]
    stages = [s for s in a.stages.split(",") if s]
    for bad in [s for s in sizes if s not in COLLECTIONS] + [s for s in stages if s not in STAGES]:
        raise SystemExit(f"error: unknown size or stage {bad!r} (stages: {', '.join(STAGES)})")
    deadline = float("inf")
    if a.deadline:
        hh, mm = (int(x) for x in a.deadline.split(":"))
        now = dt.datetime.now(dt.timezone.utc)
        deadline = now.replace(hour=hh, minute=mm, second=0, microsecond=0).timestamp()
    data, scratch = Path(a.data), Path(a.scratch)
    path = RESULTS_DIR / "scale.json"
    for rows in sizes:
        ready = data / f"{COLLECTIONS[rows]}.READY"
        if ready.exists():
            doc = json.loads(path.read_text()) if path.exists() else {}
            per_row = {**doc.get("storage_bytes_per_row", {})}
            # a folder this collection lacks now (an index since deleted) keeps its figure
            per_row[label(rows)] = {
                **per_row.get(label(rows), {}),
                **storage_per_row(data / COLLECTIONS[rows], rows),
            }
            write_results("scale", {"storage_bytes_per_row": per_row}, merge=True)
        for stage in stages:
            doc = json.loads(path.read_text()) if path.exists() else {}
            if not ready.exists():
                entry: dict[str, Any] = {"rows": rows, "skipped": f"{ready} does not exist yet"}
            else:
                entry = run_stage(
                    stage, rows, data, scratch / label(rows), deadline, Path(a.index_results)
                )
            # read again: another run may have written a stage while this one ran
            doc = json.loads(path.read_text()) if path.exists() else {}
            before = doc.get(label(rows), {})
            if "skipped" in entry and "seconds" in before.get(stage, {}):
                continue  # a stage not run now keeps what an earlier run measured
            sized = {**before, stage: entry}
            doc[label(rows)] = sized
            write_results("scale", {label(rows): sized, **summary(doc)}, merge=True)
    print(json.dumps(summary(json.loads(path.read_text())), indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
