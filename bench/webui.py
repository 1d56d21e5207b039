"""`python -m bench.webui [--only demo,1m,first_page]` → bench/results/webui.json.

- demo (`search_rerun_ms`, goal ≤ 300 ms): the web UI's Search page driven by Streamlit's
  AppTest in a fresh process on the demo collection (`make demo` builds it; `--demo`): after
  one warm-up search (CLIP, FAISS and the metadata rows loaded), the median wall time of a
  rerun with a new text query each time (encode, search, row look-ups, thumbnails read from
  the source shards, the page's script), over `--reruns` queries.
- 1m (`search_rerun_ms_1m`, goal ≤ 500 ms; `rss_mb_1m`, goal ≤ 1,000 MB): the same against a
  generated collection of `--n` rows (default 1M) in `--parts` parts, clustered vectors of
  sieve-tiny's dimension, an IVF-PQ index (`--index-key`), built once into `--work`; its rows
  point at real images of a small generated shard by byte range. `rss_mb_1m` is the app
  process's resident memory (VmRSS) after the reruns, with the collection open; the SQL
  sandbox's worker process is reported beside it (`sandbox_rss_mb_1m`).
- grid (`label_click_ms`, goal ≤ 150; `label_saved_ms`; `results_per_screen` at 1,400 × 900):
  the result grid in headless chromium on a copy of the demo collection: the Search page's
  cards wholly inside one screen (k=100), and on the Concepts page `--labels` labels given
  with the keys, each timed in the page (`webui/grid/grid.js`) from the key event to the
  label drawn with the cursor on the next card, and to the grid showing it saved by Python.
- weak (`weak_flag`): the share of top-20 results the Search page flags weak, for generated
  captions (the collection holds real matches) and for nonsense queries.
- first_page (`first_page_s`): from starting `streamlit run webui/app.py` to the Search page's
  title drawn in headless Chromium (Debian's, through Playwright), bundled models cached; also
  `first_search_s`, from then to the first grid of results (the index and CLIP load meanwhile).

Each collection is measured in its own child process so one's memory never counts for another.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
from streamlit.testing.v1 import AppTest

from bench.browser import (
    CHROMIUM,
    CHROMIUM_ARGS,
    browser_page,
    free_port,
    streamlit_command,
    streamlit_server,
    wait_for_thumbnails,
    wait_until,
)
from bench.common import rss_mb, write_results
from bench.synthetic import write_vector_collection
from collection import schema as S
from collection.shards import list_shards, read_shard
from curation.catalog import Catalog
from indices.build import build
from indices.query import query
from indices.search import Searcher
from models.runtime import setup_logging
from models.scenes import make_sample
from pipelines.generate import write_sample_dataset
from webui import state
from webui.grid import WEAK_QUANTILE, cards_of, collection_weak_threshold, weak_flags

log = logging.getLogger("bench.webui")

REPO = Path(__file__).resolve().parent.parent
APP = str(REPO / "webui" / "app.py")
PARTS = ("demo", "1m", "first_page", "grid", "weak")


def queries(n: int, seed: int = 7) -> list[str]:
    """n distinct generated captions: new text for every rerun, so no answer comes from a cache."""
    out: list[str] = []
    i = 0
    while len(out) < n:
        caption = make_sample(i, seed=seed).caption
        if caption not in out:
            out.append(caption)
        i += 1
    return out


# ---- the child: one collection, one process --------------------------------------------------
def measure_reruns(collection: str, reruns: int) -> dict[str, Any]:
    """In this process: the Search page's warm reruns on `collection` (AppTest), then memory."""
    at = AppTest.from_file(APP, default_timeout=600)
    at.session_state["collections"] = [collection]
    t = time.perf_counter()
    at.run()
    first_page = time.perf_counter() - t
    texts = queries(reruns + 1)
    t = time.perf_counter()
    at.text_input(key="search_text").input(texts[0]).run()  # waits for CLIP, FAISS and the rows
    warm_up = time.perf_counter() - t
    if at.exception or at.error:
        raise RuntimeError(f"the search page failed: {at.exception or at.error[0].value}")
    times = []
    for text in texts[1:]:
        t = time.perf_counter()
        at.text_input(key="search_text").input(text).run()
        times.append((time.perf_counter() - t) * 1000)
        if at.exception or not at.get("bidi_component"):
            raise RuntimeError(f"rerun with {text!r} showed no results: {at.exception}")
    shown = [c for g in at.get("bidi_component") for c in cards_of(g)]
    thumbs = sum(c["src"] is not None for c in shown)
    health = state.inspect(collection)
    worker = state.loaded(collection, health.signature).catalog().worker_pid
    return {
        "rerun_ms": statistics.median(times),
        "rerun_ms_p90": sorted(times)[int(0.9 * (len(times) - 1))],
        "reruns": len(times),
        "first_run_s": first_page,
        "warm_up_s": warm_up,
        "thumbnails": thumbs,
        "results": len(shown),
        "rss_mb": rss_mb(),
        "rss_peak_mb": rss_mb(field="VmHWM"),
        "sandbox_rss_mb": rss_mb(worker) if worker else None,
    }


def _child(collection: str, reruns: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "bench.webui", "--child", collection, "--reruns", str(reruns)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"child on {collection} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- the parts ---------------------------------------------------------------------------------
def demo(args: argparse.Namespace) -> dict[str, Any]:
    if not os.path.isdir(S.CollectionLayout(args.demo).indices_dir):
        raise SystemExit(f"{args.demo}: no indexed collection; build it with `make demo`")
    res = _child(args.demo, args.reruns)
    return {"search_rerun_ms": round(res["rerun_ms"], 1), "demo": {"collection": args.demo, **res}}


def build_million(args: argparse.Namespace) -> str:
    """The generated collection (kept in --work across runs): rows, vectors, IVF-PQ index."""
    work = Path(args.work)
    root = str(work / f"collection_{args.n}")
    shards = work / "shards"
    if not (shards / S.stats_name(0)).exists():
        write_sample_dataset(shards, 1000, shard_size=1000)
    rows = []
    for shard in list_shards(str(shards)):
        for raw in read_shard(shard):
            if raw.image is not None and raw.offset is not None:
                rows.append(
                    {
                        S.SOURCE_SHARD: shard.url,
                        S.SOURCE_OFFSET: raw.offset,
                        S.SOURCE_SIZE: raw.size,
                        S.SHA256: hashlib.sha256(raw.image).hexdigest(),
                    }
                )  # thumbnails check it
    write_vector_collection(root, args.n, args.parts, args.dim, sources=pa.Table.from_pylist(rows))
    layout = S.CollectionLayout(root)
    if not os.path.exists(layout.index_json(S.MODALITY_IMAGE)):
        build(root, max_index_memory="4G", modality="image", index_key=args.index_key)
    return root


def million(args: argparse.Namespace) -> dict[str, Any]:
    root = build_million(args)
    res = _child(root, args.reruns)
    return {
        "search_rerun_ms_1m": round(res["rerun_ms"], 1),
        "rss_mb_1m": round(res["rss_mb"], 1),
        "sandbox_rss_mb_1m": round(res["sandbox_rss_mb"], 1) if res["sandbox_rss_mb"] else None,
        "1m": {
            "collection": root,
            "rows": args.n,
            "parts": args.parts,
            "index_key": args.index_key,
            **res,
        },
    }


def first_page(args: argparse.Namespace) -> dict[str, Any]:
    """`streamlit run` to the first page drawn, in a real browser; then to the first results."""
    try:
        from playwright.sync_api import sync_playwright  # optional: the ui-test extra
    except ImportError:
        raise SystemExit(
            "first_page needs Playwright (pip install -e '.[ui-test]') and Debian's chromium"
        ) from None
    if not os.path.exists(CHROMIUM):
        raise SystemExit(
            f"first_page needs Debian's chromium at {CHROMIUM} (apt-get install -y chromium)"
        )
    port = free_port()
    cmd = streamlit_command(args.demo, port)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        t0 = time.perf_counter()
        server = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            while True:
                try:
                    page.goto(f"http://127.0.0.1:{port}/", timeout=2000)
                    break
                except Exception as exc:  # playwright's Error: the server is not listening yet
                    if time.perf_counter() - t0 > 120 or server.poll() is not None:
                        raise RuntimeError(f"streamlit did not start: {exc}") from None
                    time.sleep(0.05)
            page.get_by_role("heading", name="Search").wait_for(timeout=120_000)
            first = time.perf_counter() - t0
            box = page.get_by_role("textbox", name="Text query")
            box.fill(queries(1)[0])
            t1 = time.perf_counter()
            box.press("Enter")
            page.get_by_text("results from the").wait_for(timeout=300_000)
            search = time.perf_counter() - t1
        finally:
            browser.close()
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:  # still loading CLIP in its background thread, say
                server.kill()
                server.wait()
    return {
        "first_page_s": round(first, 2),
        "first_search_s": round(search, 2),
        "first_page": {
            "collection": args.demo,
            "method": "streamlit run + headless chromium (playwright)",
        },
    }


def grid_figures(args: argparse.Namespace) -> dict[str, Any]:
    """The result grid in headless chromium on a copy of the demo collection (labels are
    written into it): `label_click_ms`, `label_saved_ms`, `results_per_screen`."""
    work = Path(args.work) / "grid"
    shutil.rmtree(work, ignore_errors=True)
    coll = str(work / "collection")
    shutil.copytree(args.demo, coll)
    with (
        streamlit_server(coll, work / "server.log") as server,
        browser_page(server, 1400, 900) as page,
    ):
        page.get_by_role("heading", name="Search").wait_for(timeout=300_000)
        screen = results_per_screen(page)
        clicks = label_clicks(page, args.labels)
    shutil.rmtree(work, ignore_errors=True)
    return {
        "label_click_ms": round(statistics.median(clicks["drawn"]), 1),
        "label_saved_ms": round(statistics.median(clicks["saved"]), 1),
        "results_per_screen": screen["per_screen"],
        "grid": {
            "collection": args.demo,
            "viewport": [1400, 900],
            **screen,
            "label_click_ms_p90": round(_p90(clicks["drawn"]), 1),
            "label_saved_ms_p90": round(_p90(clicks["saved"]), 1),
            "labels": len(clicks["drawn"]),
            "method": "label_click_ms: in the page, from the key event to the next animation "
            "frame after the label is drawn and the cursor moved (the next key is accepted "
            "then); label_saved_ms: from the key event to the grid showing Python's answer "
            "(the fragment rerun that wrote concepts/NAME.labels.json), one key at a time",
        },
    }


def _p90(values: list[float]) -> float:
    return sorted(values)[int(0.9 * (len(values) - 1))]


def results_per_screen(page: Any) -> dict[str, Any]:
    """Search "a red circle" (k=100), the grid's top at the window's top: the cards wholly in
    one 900 px screen, and in the first screen as the page opens."""
    box = page.get_by_role("textbox", name="Text query")
    k = page.get_by_role("spinbutton", name="k", exact=True)
    k.fill("100")
    k.press("Enter")
    box.fill("a red circle")
    box.press("Enter")
    page.get_by_text("100 results from the", exact=False).wait_for(timeout=300_000)
    wait_for_thumbnails(page, 100, timeout=300_000)
    cards = page.locator(".sg-card")
    script = "cs => cs.filter(c => { const r = c.getBoundingClientRect();"
    script += " return r.top >= 0 && r.bottom <= window.innerHeight; }).length"
    first = cards.evaluate_all(script)
    cards.first.evaluate("c => c.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(300)
    tops = cards.evaluate_all("cs => cs.map(c => c.offsetTop)")
    return {
        "per_screen": cards.evaluate_all(script),
        "first_screen": first,
        "per_row": tops.count(tops[0]),
        "query": "a red circle",
    }


def label_clicks(page: Any, n: int) -> dict[str, list[float]]:
    """The Concepts page: search, then n labels given with the keys 1/2, each waited for."""
    page.get_by_role("link", name="Concepts").click()
    name = page.get_by_role("textbox", name="Concept name")
    name.wait_for(timeout=60_000)
    name.fill("bench-labels")
    name.press("Enter")
    find = page.get_by_role("textbox", name="Find examples")
    find.fill("a red circle")
    find.press("Enter")
    results = page.get_by_role("spinbutton", name="Results")
    results.fill(str(max(n, 20)))
    results.press("Enter")
    wait_for_thumbnails(page, max(n, 20), timeout=300_000)
    page.locator(".sg-keys").first.click()  # out of the text box: the keys go to the grid
    root = page.locator(".sg-root").first
    status = page.locator(".sg-status").first
    lines = page.locator(".sg-line").all_inner_texts()[:n]
    for i, line in enumerate(lines):
        page.keyboard.press("1" if "red circle" in line else "2")
        wait_until(lambda i=i: status.inner_text() == f"saved ({i + 1} labels)", 60, "saved")
    return {
        "drawn": json.loads(root.get_attribute("data-label-ms")),
        "saved": json.loads(root.get_attribute("data-saved-ms")),
    }


def weak_flag(args: argparse.Namespace) -> dict[str, Any]:
    """How the Search page's weak flag separates real queries (generated captions: the
    collection holds true matches) from nonsense ones, on the demo collection: the share of
    top-20 results flagged for each."""
    with Catalog(args.demo) as cat:
        threshold = collection_weak_threshold(cat)
    if threshold is None:
        raise SystemExit(f"{args.demo}: no {S.CLIP_SIMILARITY} column, nothing is flagged")
    searcher = Searcher(args.demo)

    def flagged(texts: list[str]) -> tuple[list[float], list[bool]]:
        share, top1 = [], []
        for text in texts:
            rows = query(
                args.demo,
                text=text,
                k=20,
                safe_mode=False,
                deduplicate=False,
                hide_watermarked=False,
                searcher=searcher,
            )
            weak = weak_flags([r["similarity"] for r in rows], threshold)
            share.append(sum(weak) / max(len(weak), 1))
            top1.append(bool(weak and weak[0]))
        return share, top1

    (real, real1), (nonsense, nonsense1) = flagged(queries(20, seed=3)), flagged(list(NONSENSE))
    return {
        "weak_flag": {
            "threshold": round(threshold, 4),
            "rule": f"similarity < the {WEAK_QUANTILE} quantile of clip_similarity "
            "(each image against its own caption), on pages whose best result is under it too "
            "(webui.grid.weak_flags)",
            "real_queries": len(real),
            "real_top1_flagged_share": round(statistics.mean(real1), 3),
            "real_top20_flagged_share": round(statistics.mean(real), 3),
            "nonsense_queries": list(NONSENSE),
            "nonsense_top1_flagged_share": round(statistics.mean(nonsense1), 3),
            "nonsense_top20_flagged_share": round(statistics.mean(nonsense), 3),
            "collection": args.demo,
        }
    }


#: queries the generated collection holds no match for
NONSENSE = (
    "zebra",
    "the quarterly tax report",
    "asdf qwerty",
    "a photo of a spaceship",
    "a bowl of ramen",
    "an old man reading a newspaper",
)


RUNNERS = {
    "demo": demo,
    "1m": million,
    "first_page": first_page,
    "grid": grid_figures,
    "weak": weak_flag,
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.webui",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {PARTS}")
    p.add_argument("--demo", default=str(REPO / "demo" / "collection"), help="the demo collection")
    p.add_argument("--n", type=int, default=1_000_000, help="rows of the generated collection")
    p.add_argument("--parts", type=int, default=100)
    p.add_argument("--dim", type=int, default=128, help="vector dimension (sieve-tiny's: 128)")
    p.add_argument("--index-key", default="IVF1024,PQ32x8")
    p.add_argument(
        "--work",
        default=str(REPO / "bench" / "work" / "webui"),
        help="where generated data is kept",
    )
    p.add_argument("--reruns", type=int, default=20)
    p.add_argument("--labels", type=int, default=20, help="labels given in the grid part")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--no-write", action="store_true", help="print the figures, leave bench/results alone"
    )
    a = p.parse_args(argv)
    setup_logging(logging.WARNING if a.child else logging.INFO)
    if a.child:
        print(json.dumps(measure_reruns(a.child, a.reruns)))
        return
    parts = [x.strip() for x in a.only.split(",") if x.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"--only: unknown part(s) {unknown}; known: {list(PARTS)}")
    out: dict[str, Any] = {}
    for part in parts:
        log.info("part %s", part)
        out.update(RUNNERS[part](a))
        log.info("%s", {k: v for k, v in out.items() if not isinstance(v, dict)})
    print(json.dumps(out, indent=1))
    if not a.no_write:
        print(write_results("webui", out, merge=True))


if __name__ == "__main__":
    main()
