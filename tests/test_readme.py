"""The README stays honest: every command it names answers --help, its Python snippets run on
demo-sized data, its figures are the ones in bench/results, and it links
nothing outside the repo."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bench import figures

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
OURS = ("pipelines", "indices", "curation", "models", "hdit_train", "bench", "webui")


def _modules() -> list[str]:
    found = re.findall(r"(?:python -m|torchrun [^`\n]*?-m) ([A-Za-z_][\w.]*)", README)
    return sorted(
        {m for m in found if m.split(".")[0] in OURS and not m.isupper() and "NAME" not in m}
    )


def test_readme_names_the_commands_it_documents():
    assert {
        "pipelines.generate",
        "pipelines.embed",
        "indices.build",
        "indices.serve",
        "models.train",
        "hdit_train.train",
        "hdit_train.sample",
    } <= set(_modules())


def test_every_command_in_the_readme_answers_help():
    def run(module: str) -> tuple[str, int, str]:
        done = subprocess.run(
            [sys.executable, "-m", module, "--help"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        return module, done.returncode, done.stdout + done.stderr

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, _modules()))
    failed = [
        f"{m}: exit {rc}: {out[-300:]}"
        for m, rc, out in results
        if rc != 0 or "usage" not in out.lower()
    ]
    assert failed == []


def test_the_readme_figures_are_the_measured_ones():
    assert figures.block(README) == figures.render()


def test_links_stay_inside_the_repository():
    links = re.findall(r"\]\(([^)]+)\)", README)
    assert links, "the README links its design doc"
    for link in links:
        assert not link.startswith(("..", "/")), link
        if not link.startswith(("http://", "https://", "#")):
            assert (REPO / link).exists(), link


@pytest.fixture(scope="module")
def demo_sized(demo_collection) -> dict[str, str]:
    """What `make demo` builds, smaller (conftest's session-wide collection)."""
    return demo_collection


SNIPPETS = re.findall(r"```python\n(.*?)```", README, re.S)


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_python_snippets_run_on_demo_sized_data(snippet, demo_sized, tmp_path):
    for path, replacement in demo_sized.items():
        snippet = snippet.replace(path, replacement)
    script = tmp_path / "snippet.py"
    script.write_text(snippet)
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip(), "a README snippet should show its result"
