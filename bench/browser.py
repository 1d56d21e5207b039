"""Real-browser pieces the web UI tests and benchmarks share: `streamlit run webui/app.py` on a
free loopback port, and a page of Debian's chromium (through Playwright) opened on it."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parent.parent
#: Debian's chromium; SIEVE_CHROMIUM points elsewhere (or at nothing, to see the skip)
CHROMIUM = os.environ.get("SIEVE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def missing() -> str | None:
    """Why the browser tests cannot run here (None: they can)."""
    try:
        import playwright.sync_api  # noqa: F401  (optional: the ui-test extra)
    except ImportError:
        return "Playwright is not installed (pip install -e '.[ui-test]')"
    if not os.path.exists(CHROMIUM):
        return f"Debian's chromium is not at {CHROMIUM} (apt-get install -y chromium)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def streamlit_command(collection: str, port: int) -> list[str]:
    """`streamlit run webui/app.py -- --collection COLLECTION`, headless on 127.0.0.1:port."""
    return [
        sys.executable,
        *("-m", "streamlit", "run", str(REPO / "webui" / "app.py")),
        *("--server.headless", "true", "--server.port", str(port)),
        *("--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"),
        *("--", "--collection", collection),
    ]


@contextlib.contextmanager
def streamlit_server(collection: str, log: Path) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """`streamlit run webui/app.py -- --collection COLLECTION` on a free port, its output in
    `log`; yields (url, process, log) and stops it afterwards."""
    port = free_port()
    cmd = streamlit_command(collection, port)
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    try:
        yield f"http://127.0.0.1:{port}/", proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def browser_page(server: tuple[str, subprocess.Popen, Path], width: int = 1400, height: int = 1000):
    """A chromium page on the server's first page, once the server answers."""
    from playwright.sync_api import (
        sync_playwright,
    )  # optional (the ui-test extra): the modules using it skip without it

    url, proc, log = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": width, "height": height})
        deadline = time.monotonic() + 120
        while True:
            try:
                pg.goto(url, timeout=5000)
                break
            except Exception as exc:  # playwright's Error: not listening yet
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(
                        f"streamlit did not start: {exc}\n{log.read_text()[-2000:]}"
                    ) from None
                time.sleep(0.5)
        try:
            yield pg
        finally:
            browser.close()


def wait_until(check: Callable[[], bool], seconds: float, what: str = "") -> None:
    """Poll `check` until it holds; TimeoutError (naming `what`) after `seconds`."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not so after {seconds} s: {what or check}")
        time.sleep(0.1)


def wait_for_thumbnails(page: Any, n: int, timeout: int = 60_000) -> None:
    """Until `n` of the result grid's thumbnails are decoded (the grid draws in a shadow root,
    which Playwright's locators enter)."""
    imgs = page.locator(".sg-card img")
    script = "els => els.filter(i => i.complete && i.naturalWidth > 0).length"
    wait_until(lambda: imgs.evaluate_all(script) >= n, timeout / 1000, f"{n} thumbnails")
