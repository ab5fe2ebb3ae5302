"""The workbook's notebooks: stored clean (no outputs, no execution counts, a parameters cell first) and executed
top to bottom with nbmake, one subprocess per notebook (`python -m pytest --nbmake notebooks/<name>`), so a failure
names its notebook and shows nbmake's report.

Executing them takes minutes on a CPU; set LAZYMAR_SKIP_NOTEBOOKS=1 to run only the storage checks. Outside CI a
missing nbmake skips the execution tests; under CI=true it fails.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
EXPECTED = ["01_token_redundancy.ipynb", "02_condition_redundancy.ipynb", "03_cache_schedules.ipynb",
            "04_paper_figures.ipynb"]
TIMEOUT_S = 600  # per notebook; the issue asks for <= 5 minutes each on a CPU


def test_the_workbook_is_complete():
    assert [p.name for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
             and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs or execution counts; clear them before committing"
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and "parameters" in code[0].metadata.get("tags", []), \
        f"{path.name}: the first code cell must be the parameters cell (tag 'parameters')"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path):
    if os.environ.get("LAZYMAR_SKIP_NOTEBOOKS") == "1":
        pytest.skip("LAZYMAR_SKIP_NOTEBOOKS=1")
    if importlib.util.find_spec("nbmake") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("nbmake is not installed; under CI=true it must be (pip install -e '.[test]')", pytrace=False)
        pytest.skip("nbmake is not installed")
    command = [sys.executable, "-m", "pytest", "--nbmake", f"--nbmake-timeout={TIMEOUT_S}", "-q",
               "-p", "no:cacheprovider", str(path)]
    env = dict(os.environ, MPLBACKEND="module://matplotlib_inline.backend_inline")
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S + 120)
    assert run.returncode == 0, f"{path.name} failed under nbmake:\n{(run.stdout + run.stderr)[-6000:]}"
