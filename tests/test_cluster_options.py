"""Every Dask job's command takes `--scheduler` and `--workers` from one definition that imports
no Dask, and refuses a negative worker count in one line."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
COMMANDS = (
    "curation.dedup",
    "curation.map",
    "curation.uniqueness",
    "curation.stats",
    "curation.export",
    "indices.build",
    "pipelines.embed",
)


def test_the_options_are_defined_once_and_import_no_dask():
    defined = [
        str(path.relative_to(REPO))
        for folder in ("collection", "curation", "indices", "pipelines", "models", "webui")
        for path in (REPO / folder).rglob("*.py")
        if '"--scheduler"' in path.read_text() or '"--workers"' in path.read_text()
    ]
    assert defined == ["collection/cluster_options.py"]
    code = "import sys, collection.cluster_options; print('dask' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_every_job_takes_them_and_refuses_a_negative_count(command, capsys):
    main = importlib.import_module(command).main
    with pytest.raises(SystemExit):
        main(["--help"])
    usage = capsys.readouterr().out
    assert "--scheduler ADDRESS" in usage and "--workers N" in usage
    with pytest.raises(SystemExit) as exc:
        main(["somewhere", "--workers", "-1"])
    assert exc.value.code == 2
    assert "--workers: -1 is negative" in capsys.readouterr().err
