"""The workbook's notebooks: the percent-format ``notebooks/*.py`` files are the source, paired by jupytext
(``notebooks/jupytext.toml``) with ``.ipynb`` twins stored clean (no outputs, no execution counts, a parameters
cell first). Each notebook is executed top to bottom with nbmake, one subprocess per notebook, from a copy whose
``FIGURES`` parameter points at a temporary folder, so running the tests leaves the checkout as it was.

Executing them takes minutes on a CPU; set LAZYMAR_SKIP_NOTEBOOKS=1 to run only the storage checks. Outside CI a
missing nbmake skips the execution tests; under CI=true it fails.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = ["01_token_redundancy.ipynb", "02_condition_redundancy.ipynb", "03_cache_schedules.ipynb",
            "04_paper_figures.ipynb"]
TIMEOUT_S = 900  # per notebook (a few minutes each on an idle 2-core CPU; room for a loaded CI machine)


def _cells(nb) -> list[tuple[str, str, list]]:
    return [(c.cell_type, c.source.strip("\n"), list(c.metadata.get("tags", []))) for c in nb.cells]


def test_the_workbook_is_complete():
    assert [p.name for p in NOTEBOOKS] == EXPECTED
    assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.py")) == [Path(n).with_suffix(".py").name for n in EXPECTED]
    assert 'formats = "ipynb,py:percent"' in (NOTEBOOK_DIR / "jupytext.toml").read_text()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_pair_is_in_sync(path):
    """The .ipynb holds exactly the cells of its .py source (run `jupytext --sync notebooks/*.py` after editing)."""
    source = jupytext.read(path.with_suffix(".py"))
    stored = nbformat.read(path, as_version=4)
    expected, actual = _cells(source), _cells(stored)
    mismatch = next((i for i, (a, b) in enumerate(zip(expected, actual)) if a != b), None)
    assert len(expected) == len(actual) and mismatch is None, (
        f"{path.name} is out of sync with {path.with_suffix('.py').name} ({len(actual)} vs {len(expected)} cells, "
        f"first difference at cell {mismatch}); run `jupytext --sync notebooks/{path.stem}.py`")


def test_sync_check_fails_on_a_changed_source(tmp_path):
    """The pair check compares content: an edited .py no longer matches its .ipynb."""
    source = jupytext.read(NOTEBOOKS[0].with_suffix(".py"))
    source.cells[-1].source += "\nprint('edited')"
    assert _cells(source) != _cells(nbformat.read(NOTEBOOKS[0], as_version=4))


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
    assert "STATS = " in code[0].source and "FIGURES = " in code[0].source, \
        f"{path.name}: the parameters cell must name the recording (STATS) and the figures folder (FIGURES)"


def _parametrised_copy(path: Path, folder: Path, figures: Path) -> Path:
    """``path`` with FIGURES set to ``figures`` (a cell injected after the parameters, as papermill does), run from
    notebooks/ so that its relative default paths resolve as they do by hand."""
    nb = jupytext.read(path.with_suffix(".py"))
    first = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(first + 1, nbformat.v4.new_code_cell(
        f"import os\nos.chdir({str(NOTEBOOK_DIR)!r})\nFIGURES = {str(figures)!r}",
        metadata={"tags": ["injected-parameters"]}))
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    out = folder / path.name
    nbformat.write(nb, out)
    return out


def _git_status() -> str | None:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        return None
    run = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO, capture_output=True,
                         text=True)
    return run.stdout if run.returncode == 0 else None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path):
    if os.environ.get("LAZYMAR_SKIP_NOTEBOOKS") == "1":
        pytest.skip("LAZYMAR_SKIP_NOTEBOOKS=1")
    if importlib.util.find_spec("nbmake") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("nbmake is not installed; under CI=true it must be (pip install -e '.[test]')", pytrace=False)
        pytest.skip("nbmake is not installed")
    figures = tmp_path / "figures"
    copy = _parametrised_copy(path, tmp_path, figures)
    before = _git_status()
    command = [sys.executable, "-m", "pytest", "--nbmake", f"--nbmake-timeout={TIMEOUT_S}", "-q",
               "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(copy)]
    env = dict(os.environ, MPLBACKEND="module://matplotlib_inline.backend_inline",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S + 120)
    assert run.returncode == 0, f"{path.name} failed under nbmake:\n{(run.stdout + run.stderr)[-6000:]}"
    assert _git_status() == before, f"{path.name} changed the checkout (git status before and after differ)"
    if path.name == "04_paper_figures.ipynb":
        written = {p.name for p in figures.iterdir()}
        assert {"ablations.csv", "ablations.md", "schedules.png", "token_ecdf_v.pdf"} <= written
