"""`python -m bench.webui_memory [--only 1m,10m]` → bench/results/webui.json (merged).

A scripted curator's session through the web UI (Streamlit's AppTest, in a fresh process per
collection, so that process's memory is the app's): search, Explore, a concept labelled and
trained, a subset built clause by clause, an export.

- 1m (`rss_mb_1m`, goal ≤ 1,000 MB; `rss_mb_1m_peak`, goal ≤ 1,500 MB): the app's resident
  memory (VmRSS) idle after the first search (the collection open: index, rows and SQL sandbox
  loaded), and its high-water mark (VmHWM) over the whole session. Memory-mapped index, row and
  embedding pages the app touched count in VmRSS (`rss_file_mb_1m` says how much); a sampler
  every 20 ms records the session's largest anonymous (heap) and file-backed (memory-mapped)
  parts (`rss_anon_mb_1m_peak`, `rss_file_mb_1m_peak`); the CLIP encoder process
  (`webui.encoder`) and the SQL sandbox's worker are reported beside them.
- 10m (`action_s_10m`, goal ≤ 3 s each): click-to-result of a search, opening Explore, adding a
  where clause and a kNN clause to a subset, training a concept (its fit shown; `concept_ranked`:
  until the collection's ranking, scored in the background, shows), on a 10M-row collection
  (`--collection-10m`; `--fallback-1m` measures them on the 1M one when it is not ready).

The collections are generated ones (`bench.synthetic`), whose vectors may not match the
dimension of the CLIP spec their collection.json names; `--encoder` then names the spec whose
text tower encodes the queries (a random-init open_clip of the right width: timings and the
app's memory do not depend on its weights, only on its output width).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.apptest import results
from bench.common import rss_mb, write_results
from curation.labels import save_labels
from models.runtime import setup_logging

log = logging.getLogger("bench.webui_memory")

REPO = Path(__file__).resolve().parent.parent
APP = str(REPO / "webui" / "app.py")
PARTS = ("1m", "10m")
QUERIES = ("a red circle", "two blue squares", "a small green star", "a yellow hexagon")
CONCEPT = "bench-red"


def _rss() -> dict[str, float]:
    return {
        "rss_mb": round(rss_mb(), 1),
        "rss_file_mb": round(rss_mb(field="RssFile"), 1),
        "rss_anon_mb": round(rss_mb(field="RssAnon"), 1),
        "peak_mb": round(rss_mb(field="VmHWM"), 1),
    }


class Sampler(threading.Thread):
    """The largest RssAnon and RssFile of this process, sampled every `every` seconds."""

    def __init__(self, every: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.every, self.anon, self.file = every, 0.0, 0.0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every):
            self.anon = max(self.anon, rss_mb(field="RssAnon"))
            self.file = max(self.file, rss_mb(field="RssFile"))


def _timed(step: Any) -> float:
    t = time.perf_counter()
    at = step()
    took = time.perf_counter() - t
    if at.exception:
        raise RuntimeError(f"the page failed: {at.exception[0].value}")
    return round(took, 3)


def _until_ranked(at: Any, every: float = 0.25) -> float:
    """Seconds until the Concepts page shows the ranking, which the encoder process scores in
    the background after Train shows the fit (a browser's fragment reruns the page as AppTest
    does here)."""
    t = time.perf_counter()
    while any("Scoring the collection" in i.value for i in at.info):
        time.sleep(every)
        at.run()
    return time.perf_counter() - t


def session(collection: str, encoder: str | None, export_to: str) -> dict[str, Any]:
    """In this process: the scripted session on `collection`; timings and memory."""
    # the app's modules: imported here, after the arguments, in the measured process only
    from streamlit.testing.v1 import AppTest

    from webui import state
    from webui.encoder import EncoderClient

    spec = state.read_collection_json(collection).get("clip_model", state.TINY_NAME)
    if encoder:
        state._ENCODERS[spec] = EncoderClient(encoder)
    out: dict[str, Any] = {"collection": collection, "encoder": encoder or spec, "actions_s": {}}
    act = out["actions_s"]
    sampler = Sampler()
    sampler.start()
    at = AppTest.from_file(APP, default_timeout=1800)
    at.session_state["collections"] = [collection]
    at.session_state["data_roots"] = (collection,)
    act["first_page"] = _timed(at.run)
    box = at.text_input(key="search_text")
    act["first_search"] = _timed(lambda: box.input(QUERIES[0]).run())
    searches = [
        _timed(lambda q=q: at.text_input(key="search_text").input(q).run()) for q in QUERIES[1:]
    ]
    act["search"] = sorted(searches)[len(searches) // 2]
    if not results(at):
        raise RuntimeError(f"no search results: {[e.value for e in at.error]}")
    out["idle"] = _rss()
    log.info("idle after the first searches: %s", out["idle"])

    act["explore"] = _timed(lambda: at.switch_page("pages/explore.py").run())
    out["after_explore"] = _rss()

    at.switch_page("pages/concepts.py").run()
    at.text_input(key="concept_query").input("a red circle").run()
    # the labels as the grid's keys save them; the page reads the set back for a new name
    rows = results(at)
    save_labels(collection, CONCEPT, {r["key"]: int(i < 5) for i, r in enumerate(rows[:10])})
    at.text_input(key="concept_name").input(CONCEPT).run()
    act["train_concept"] = _timed(lambda: at.button(key="concept_train").click().run())
    act["concept_ranked"] = round(act["train_concept"] + _until_ranked(at), 3)
    if at.button(key="concept_save") is not None:
        act["save_concept"] = _timed(lambda: at.button(key="concept_save").click().run())
    out["after_concept"] = _rss()

    at.switch_page("pages/subset.py").run()
    at.session_state["subset_spec"] = {collection: {}}
    at.run()

    def add(kind: str, fill: Any) -> float:
        at.selectbox(key="subset_kind").select(kind).run()
        fill()
        took = _timed(lambda: at.button(key="subset_add").click().run())
        if at.error:
            raise RuntimeError(f"{kind} clause refused: {at.error[0].value}")
        return took

    act["add_where"] = add(
        "where", lambda: at.text_input(key="subset_where").input("width >= 256").run()
    )
    act["add_where_2"] = add(
        "where", lambda: at.text_input(key="subset_where").input("pwatermark < 0.5").run()
    )

    def knn() -> None:
        at.text_input(key="subset_knn_text").input("a red circle").run()
        at.number_input(key="subset_knn_k").set_value(5000).run()

    act["add_knn"] = add("knn", knn)
    act["add_limit"] = add("limit", lambda: at.number_input(key="subset_limit").set_value(2000))
    out["after_subset"] = _rss()

    at.text_input(key="subset_name").input("bench-session").run()
    at.button(key="subset_save").click().run()
    at.text_input(key="subset_out_bench-session").input(export_to).run()
    at.selectbox(key="subset_format").select("urls").run()
    at.toggle(key="subset_overwrite").set_value(True).run()
    act["export"] = _timed(lambda: at.button(key="subset_export").click().run())
    if at.error:
        raise RuntimeError(f"export failed: {at.error[0].value}")
    out["after_export"] = _rss()
    sampler.done.set()
    out["peak_anon_mb"], out["peak_file_mb"] = round(sampler.anon, 1), round(sampler.file, 1)
    clip = state._ENCODERS.get(spec)
    out["encoder_rss_mb"] = round(rss_mb(clip.pid), 1) if clip and clip.pid else None
    health = state.inspect(collection)
    worker = state.loaded(collection, health.signature).catalog().worker_pid
    out["sandbox_rss_mb"] = round(rss_mb(worker), 1) if worker else None
    out["torch_imported"] = "torch" in sys.modules
    out["open_clip_imported"] = "open_clip" in sys.modules
    return out


def _child(collection: str, encoder: str | None, export_to: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "bench.webui_memory", "--child", collection, "--out", export_to]
    if encoder:
        cmd += ["--encoder", encoder]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=7200)
    if done.returncode != 0:
        raise RuntimeError(f"session on {collection} failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ready(path: str) -> bool:
    return os.path.exists(path.rstrip("/") + ".READY")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.webui_memory", description=__doc__)
    p.add_argument("--only", default=",".join(PARTS), help=f"parts to run, of {','.join(PARTS)}")
    p.add_argument("--collection-1m", default="/work/bench_data/synth1m")
    p.add_argument("--collection-10m", default="/work/bench_data/synth10m")
    p.add_argument("--fallback-1m", action="store_true", help="10m's timings on 1m if not ready")
    p.add_argument("--encoder", default=None, help="CLIP spec encoding the queries (see above)")
    p.add_argument("--out", default=None, help="(child) the export folder")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    setup_logging()
    if args.child:
        print(json.dumps(session(args.child, args.encoder, args.out)))
        return
    parts = [x for x in args.only.split(",") if x]
    payload: dict[str, Any] = {}
    if "1m" in parts:
        coll = args.collection_1m
        res = _child(coll, args.encoder, os.path.join(coll, "exports", "bench-session"))
        payload["rss_mb_1m"] = res["idle"]["rss_mb"]
        payload["rss_mb_1m_peak"] = res["after_export"]["peak_mb"]
        payload["rss_file_mb_1m"] = res["idle"]["rss_file_mb"]
        payload["rss_anon_mb_1m_peak"] = res["peak_anon_mb"]
        payload["rss_file_mb_1m_peak"] = res["peak_file_mb"]
        payload["encoder_rss_mb_1m"] = res["encoder_rss_mb"]
        payload["sandbox_rss_mb_1m_session"] = res["sandbox_rss_mb"]
        payload["session_1m"] = res
    if "10m" in parts:
        coll = args.collection_10m
        measured_on = "10m"
        if not _ready(coll):
            if not args.fallback_1m:
                raise SystemExit(f"{coll}.READY does not exist yet; or pass --fallback-1m")
            coll, measured_on = args.collection_1m, "1m (the 10M collection was not ready)"
        res = _child(coll, args.encoder, os.path.join(coll, "exports", "bench-session"))
        a = res["actions_s"]
        payload["action_s_10m"] = {
            "measured_on": measured_on,
            "collection": coll,
            "search": a["search"],
            "explore": a["explore"],
            "add_clause": a["add_where_2"],
            "add_knn_clause": a["add_knn"],
            "train_concept": a["train_concept"],
            "concept_ranked": a.get("concept_ranked"),
        }
        payload["session_10m"] = res
    path = write_results("webui", payload, merge=True)
    print(f"wrote {path}: {json.dumps({k: v for k, v in payload.items() if 'session' not in k})}")


if __name__ == "__main__":
    main()
