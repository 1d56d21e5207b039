"""`python -m webui.encoder SPEC --socket PATH`: the web UI's CLIP, in a process of its own.

torch and open_clip hold about 0.75 GB before a model is loaded, and the app would carry them
for its whole life for the few milliseconds a query takes to encode. So the app starts one
encoder process per CLIP spec (on first use) and talks to it over a Unix socket
(`multiprocessing.connection`, a random key per app): `EncoderClient` has the two methods search,
kNN clauses and concepts call (`encode_texts`, `encode_images`), so it stands in for a `Clip`
anywhere, and the app's own process never imports torch. Scoring a whole collection with a
concept (`curation.concept_probe.score_collection`: torch's half-precision kernels over every
embedding) runs there too, so the app neither loads torch nor pages in the embeddings for it.
The encoder process exits with the app.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from curation.concept_probe import Concept, ranking, score_collection
from curation.concept_scores import save_concept
from models.runtime import setup_logging

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
#: the variable carrying the socket's key to the encoder process (never on its command line)
KEY_ENV = "SIEVE_ENCODER_KEY"
#: seconds the encoder process may take to load its model and answer
START_TIMEOUT = 300.0
#: how much nicer than the encodes a ranking's pass runs (scored while the curator works on)
NICER = 10


class EncoderError(ValueError):
    """The encoder process could not be started or stopped answering (one line, with its log);
    a ValueError, so pages show it as they show any query that cannot run."""


class EncoderClient:
    """A CLIP stand-in whose model lives in a child process, started on first use (and again
    if it died). Thread-safe: one request at a time on one connection."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self._key = secrets.token_bytes(32)
        self._dir = tempfile.mkdtemp(prefix="sieve-encoder-")
        self._socket = os.path.join(self._dir, "clip.sock")
        self._log = os.path.join(self._dir, "encoder.log")
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._lock = threading.Lock()
        self._dim: int | None = None

    # ---- the process ---------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """The encoder process's id (None before first use)."""
        return self._proc.pid if self._proc is not None else None

    def _start(self) -> None:
        if os.path.exists(self._socket):
            os.unlink(self._socket)
        env = {**os.environ, KEY_ENV: self._key.hex()}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        with open(self._log, "ab") as out:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "webui.encoder", self.spec, "--socket", self._socket],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(self._socket):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise EncoderError(f"CLIP encoder {self.spec}: did not start ({self._tail()})")
            time.sleep(0.05)
        self._conn = Client(self._socket, family="AF_UNIX", authkey=self._key)

    def _tail(self) -> str:
        try:
            lines = Path(self._log).read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return lines[-1] if lines else "no output"

    def _ask(self, request: tuple[str, Any]) -> Any:
        with self._lock:
            for attempt in (0, 1):
                if self._conn is None or self._proc is None or self._proc.poll() is not None:
                    self._start()
                assert self._conn is not None
                try:
                    self._conn.send(request)
                    ok, answer = self._conn.recv()
                except (EOFError, OSError) as exc:  # the process died: start it again, once
                    log.warning("CLIP encoder %s: %s; restarting it", self.spec, exc)
                    self._conn = None
                    if attempt:
                        raise EncoderError(
                            f"CLIP encoder {self.spec}: stopped answering ({self._tail()})"
                        ) from None
                    continue
                if not ok:
                    raise ValueError(answer)
                return answer
        raise AssertionError("unreachable")

    def start(self) -> EncoderClient:
        """Start the process now (the app's loading thread), not at the first query."""
        self.dim  # noqa: B018 - asks the process, which loads the model
        return self

    def close(self) -> None:
        """Stop the encoder process."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            if self._proc is not None and self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()

    # ---- what a Clip offers ----------------------------------------------------------------
    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = int(self._ask(("dim", None)))
        return self._dim

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 embeddings of captions, one row each."""
        return self._ask(("texts", list(texts)))

    def encode_images(self, images: Sequence[Any]) -> np.ndarray:
        """L2-normalised float32 embeddings of PIL images, one row each."""
        return self._ask(("images", [im.convert("RGB") for im in images]))

    def score_collection(self, collection: str, concept: Concept) -> np.ndarray:
        """`curation.concept_probe.score_collection`, run in the encoder process."""
        return self._ask(("score", (collection, concept)))

    def _ask_apart(self, request: tuple[str, Any]) -> Any:
        """`request` on a connection of its own: a pass over the whole collection never holds
        up the searches' text encodes on the shared one."""
        self.dim  # noqa: B018 - starts the process (again, if it died)
        try:
            with Client(self._socket, family="AF_UNIX", authkey=self._key) as conn:
                conn.send(request)
                ok, answer = conn.recv()
        except (EOFError, OSError) as exc:
            raise EncoderError(f"CLIP encoder {self.spec}: {exc} ({self._tail()})") from None
        if not ok:
            raise ValueError(answer)
        return answer

    def ranking(
        self, collection: str, concept: Concept, top: int = 20, near: int = 10
    ) -> dict[str, Any]:
        """`curation.concept_probe.ranking` of the collection scored in the encoder process,
        which keeps the scores for `save_concept`: the app holds no per-row array."""
        return self._ask_apart(("rank", (collection, concept, top, near)))

    def save_concept(self, collection: str, concept: Concept) -> str:
        """`curation.concept_probe.save_concept` with the collection's scores, written by the
        encoder process (from the scores `ranking` left there, else scored anew)."""
        return self._ask_apart(("save", (collection, concept)))

    def concept_passing(self, collection: str, concept: Concept, limit: float) -> np.ndarray:
        """A `curation.concept_scores.Scorer`: `np.packbits` of score >= limit over the
        collection, scored in the encoder process (an eighth of a byte a row comes back)."""
        return self._ask_apart(("passing", (collection, concept, float(limit))))


# ---- the encoder process -----------------------------------------------------------------
class _Scores:
    """The last concept's scores of a collection, kept for its Save; one pass at a time, so a
    Save asked during the ranking's pass waits for it instead of scoring again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: Any = None
        self._scores: np.ndarray | None = None

    def of(self, collection: str, concept: Concept) -> np.ndarray:
        key = (collection, json.dumps(concept.to_json(), sort_keys=True, default=str))
        with self._lock:
            if self._key != key or self._scores is None:
                self._key, self._scores = None, None  # the old array goes before the new one
                self._scores, self._key = score_collection(collection, concept), key
            return self._scores


_SCORES = _Scores()
#: the requests that score a whole collection: no model, answered beside the encodes
SCORING = ("score", "rank", "save", "passing")


def _background() -> None:
    """Lower the calling thread's CPU priority: a ranking scored while the curator works on
    must not slow the app's pages (Linux keeps a nice value per thread, and the scoring threads
    it starts inherit it); the thread serves that one request."""
    me = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, me, min(19, os.getpriority(os.PRIO_PROCESS, me) + NICER))
    except OSError as exc:  # not allowed here: scored at the usual priority
        log.info("background scoring at the usual priority: %s", exc)


def _scored(what: str, payload: Any) -> Any:
    """Answers to the requests that score a whole collection (no model needed)."""
    if what == "score":
        return score_collection(*payload)
    if what == "passing":
        collection, concept, limit = payload
        return np.packbits(_SCORES.of(collection, concept) >= limit)
    if what == "rank":
        _background()
        collection, concept, top, near = payload
        return ranking(collection, concept, _SCORES.of(collection, concept), top, near)
    collection, concept = payload
    return save_concept(collection, concept, _SCORES.of(collection, concept))


def _serve_one(conn: Connection, clip: Any, lock: threading.Lock) -> None:
    while True:
        try:
            what, payload = conn.recv()
        except (EOFError, OSError):
            return
        try:
            if what in SCORING:  # no model: beside the encodes, not after them
                conn.send((True, _scored(what, payload)))
                continue
            with lock:
                if what == "dim":
                    answer: Any = clip.dim
                elif what == "texts":
                    answer = clip.encode_texts(payload)
                elif what == "images":
                    answer = clip.encode_images(payload)
                else:
                    raise ValueError(f"unknown request {what!r}")
            conn.send((True, answer))
        except (ValueError, RuntimeError, TypeError, OSError) as exc:
            scoring = what in SCORING
            conn.send((False, f"{exc}" if scoring else f"CLIP encoder: {exc}"))


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def serve(spec: str, socket_path: str, key: bytes) -> None:
    """Load the CLIP of `spec` and answer encode requests on `socket_path` until the app exits."""
    # torch and open_clip: the whole point of this process is to hold them for the app
    from models.clip import load_clip

    clip = load_clip(spec)
    lock = threading.Lock()
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    partial = socket_path + ".starting"  # the socket appears under its name only when it answers
    with Listener(partial, family="AF_UNIX", authkey=key) as listener:
        os.replace(partial, socket_path)
        log.info("CLIP encoder %s ready on %s", spec, socket_path)
        while True:
            conn = listener.accept()
            threading.Thread(target=_serve_one, args=(conn, clip, lock), daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m webui.encoder", description=__doc__.split("\n")[0])
    p.add_argument("spec", help="the CLIP spec, as in collection.json's clip_model")
    p.add_argument("--socket", required=True, help="the Unix socket to answer on")
    args = p.parse_args(argv)
    key = os.environ.get(KEY_ENV)
    if not key:
        raise SystemExit(f"{KEY_ENV}: not set; the web UI starts this process with its key")
    setup_logging()
    serve(args.spec, args.socket, bytes.fromhex(key))


if __name__ == "__main__":
    main()
