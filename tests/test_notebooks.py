"""The workbook's notebooks: the percent-format ``notebooks/*.py`` files are the source, paired by jupytext
(``notebooks/jupytext.toml``) with ``.ipynb`` twins stored clean (no outputs, no execution counts, a parameters
cell first). Each notebook is executed top to bottom with nbmake, one subprocess per notebook, from a copy whose
``FIGURES`` parameter points at a temporary folder (injected by analysis.run_notebook, the one place that sets
notebook parameters), so running the tests leaves the checkout as it was.

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

from analysis.run_notebook import (NotebookParameterError, inject_parameters, parameter_names, parse_assignment,
                                   read_notebook)
from analysis.run_notebook import main as run_notebook_main

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = ["01_token_redundancy.ipynb", "02_condition_redundancy.ipynb", "03_cache_schedules.ipynb",
            "04_paper_figures.ipynb", "05_beyond_the_paper.ipynb"]
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
    """``path`` with FIGURES set to ``figures`` by analysis.run_notebook's injection (run from notebooks/)."""
    out = folder / path.name
    nbformat.write(inject_parameters(read_notebook(path.with_suffix(".py")), {"FIGURES": str(figures)}), out)
    return out


# --- the runner's parameter checks (analysis.run_notebook) --------------------------------------------------
def _tiny_notebook(folder: Path) -> Path:
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("OUT = 'unset'\nVALUE = 1\nNAMES: tuple = ()", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("import os, pathlib\npathlib.Path(OUT).write_text(repr((VALUE, NAMES, os.getcwd())))")])
    path = folder / "tiny.ipynb"
    nbformat.write(nb, path)
    return path


def test_parameter_names_and_injection(tmp_path):
    nb = read_notebook(_tiny_notebook(tmp_path))
    assert parameter_names(nb) == ["OUT", "VALUE", "NAMES"]
    inject_parameters(nb, {"VALUE": {"a": (1, 2.5)}, "NAMES": ("x",)})
    injected = nb.cells[1]
    assert injected.metadata["tags"] == ["injected-parameters"]
    assert "VALUE = {'a': (1, 2.5)}" in injected.source and "NAMES = ('x',)" in injected.source
    assert f"os.chdir({str(NOTEBOOK_DIR)!r})" in injected.source
    four = read_notebook(NOTEBOOK_DIR / "04_paper_figures.py")
    assert {"STATS", "MODEL", "FIGURES", "COMPARE"} <= set(parameter_names(four))


@pytest.mark.parametrize("assignment, message", [
    ("MODLE='digits16'", "no parameter 'MODLE'"),            # a name the parameters cell does not set
    ("MODEL=digits16", "not a Python literal"),              # an unquoted string
    ("MODEL=__import__('os')", "not a Python literal"),      # code, not a literal
    ("MODEL", "expected NAME=VALUE"),
])
def test_runner_rejects_bad_parameters_in_one_line(assignment, message, capsys):
    assert run_notebook_main([str(NOTEBOOK_DIR / "04_paper_figures.py"), "--set", assignment]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("python -m analysis.run_notebook: error:")


def test_parse_assignment_reads_literals():
    assert parse_assignment("X='a=b'") == ("X", "a=b")
    assert parse_assignment(" N = (1, 2) ") == ("N", (1, 2))
    with pytest.raises(NotebookParameterError, match="not a Python literal"):
        parse_assignment("X=1 +")


def test_runner_executes_with_the_values_from_notebooks(tmp_path):
    if importlib.util.find_spec("ipykernel") is None:
        pytest.skip("ipykernel is not installed")
    result = tmp_path / "result.txt"
    executed = tmp_path / "executed.ipynb"
    code = run_notebook_main([str(_tiny_notebook(tmp_path)), "--set", f"OUT={str(result)!r}", "--set", "VALUE=7",
                              "--set", "NAMES=('a', 'b')", "--out", str(executed), "--no-progress"])
    assert code == 0
    assert result.read_text() == repr((7, ("a", "b"), str(NOTEBOOK_DIR)))
    assert len(nbformat.read(executed, as_version=4).cells) == 3


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
        # the model comparison: digits is committed (digits16 is skipped until its recording is)
        assert {"models_token_redundancy.png", "models_selection_layer.csv", "models_summary.md",
                "models_tradeoff.pdf", "models_condition_redundancy.png"} <= written
    if path.name == "05_beyond_the_paper.ipynb":
        written = {p.name for p in figures.iterdir()}
        assert {"nb_sample_differences_digits16.png", "nb_sample_differences_digits.pdf", "nb_change_by_position.png",
                "nb_change_by_class.pdf"} <= written


# --- a clean checkout: default outputs go to the ignored runs/, JupyterLab saves output-free twins ---------------
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_default_outputs_go_to_ignored_folders(path):
    """A notebook run with its defaults writes only into git-ignored folders (runs/), never data/figures."""
    import ast
    nb = read_notebook(path.with_suffix(".py"))
    defaults = {}
    for node in ast.parse(next(c for c in nb.cells if "parameters" in c.metadata.get("tags", [])).source).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            defaults[node.targets[0].id] = ast.literal_eval(node.value)
    outputs = [defaults[name] for name in ("FIGURES", "SAVE_TO") if defaults.get(name)]
    assert outputs, f"{path.name}: FIGURES defaults to nothing"
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    for output in outputs:
        target = (NOTEBOOK_DIR / output).resolve().relative_to(REPO)
        ignored = subprocess.run(["git", "check-ignore", "-q", str(target / "x.png")], cwd=REPO)
        assert ignored.returncode == 0 and target.parts[0] == "runs", f"{path.name}: {output} is not under runs/"


def test_jupyterlab_saves_paired_notebooks_output_free(tmp_path):
    """`make lab` loads jupyter_server_config.py: a notebook saved with outputs, execution counts and widget state
    (as JupyterLab's autosave does after Run All) is written clean, and jupytext still writes its .py twin."""
    import asyncio

    from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager
    from jupytext.async_contentsmanager import build_async_jupytext_contents_manager_class
    from traitlets.config.loader import PyFileConfigLoader

    assert "--config=jupyter_server_config.py" in (REPO / "Makefile").read_text()
    config = PyFileConfigLoader("jupyter_server_config.py", path=str(REPO)).load_config()
    (tmp_path / "notebooks").mkdir()
    shutil.copy(NOTEBOOK_DIR / "jupytext.toml", tmp_path / "notebooks")
    manager = build_async_jupytext_contents_manager_class(AsyncLargeFileManager)(root_dir=str(tmp_path), config=config)
    nb = read_notebook(NOTEBOOK_DIR / "03_cache_schedules.py")
    for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        cell.execution_count = i + 1
        cell.outputs = [nbformat.v4.new_output("execute_result", {"text/plain": "2"}, execution_count=i + 1)]
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    asyncio.run(manager.save({"type": "notebook", "content": nb}, "notebooks/03_cache_schedules.ipynb"))
    saved = nbformat.read(tmp_path / "notebooks" / "03_cache_schedules.ipynb", as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in saved.cells if c.cell_type == "code")
    assert set(saved.metadata) == {"kernelspec", "language_info"}
    assert _cells(saved) == _cells(nbformat.read(NOTEBOOK_DIR / "03_cache_schedules.ipynb", as_version=4))
    assert (tmp_path / "notebooks" / "03_cache_schedules.py").read_text() == \
        (NOTEBOOK_DIR / "03_cache_schedules.py").read_text()


# --- an official-format checkpoint through every notebook ----------------------------------------------------------
OFFICIAL_PARAMETERS = {  # per notebook: what differs for a 2+2-block model recorded on 4 steps
    "01_token_redundancy": {"FOCUS_LAYER": "decoder.1", "LIVE_SAMPLES": 2},
    "02_condition_redundancy": {"LIVE_LAYERS": ("decoder.0", "z"), "LIVE_SAMPLES": 2},
    "03_cache_schedules": {"SWEEP": None, "CHECK_SAMPLES": 2},
    "04_paper_figures": {"SWEEP": "no_sweep.csv", "LIVE_SAMPLES": 2, "ABLATION_SAMPLES": 2, "REFRESH_INTERVALS": (2,),
                         "COMPARE": {}},
    "05_beyond_the_paper": {"NUM_ITER": 16, "SCHEDULES": {"lazymar preset": "lazymar"}, "ALSO": {},
                            "LAYER": "decoder.1", "LABELS": (0, 1)},
}
# appended to notebook 03: press Measure (the VAE makes images, so the sample grid is drawn) and save the schedule
CHECK_CELL = """result = explorer.run_check(timeout=600)
assert explorer.error is None, explorer.error
assert result is not None and explorer.samples.value[:4] == b"\\x89PNG", explorer.status.value
explorer.save_schedule(SAVE_TO)"""


@pytest.fixture(scope="module")
def official_tiny(tmp_path_factory):
    """The tiny official-format MAR checkpoint (tests/test_loading.py's fixture), a recording of it on 4 steps with
    CFG, and a tiny KL VAE saved as MAR's kl16.ckpt is (key "model")."""
    import torch

    from builders import tiny_vae
    from conftest import reference_dir
    checkpoint = reference_dir() / "mar_tiny_a.pth"
    if not checkpoint.is_file():
        pytest.skip(f"no {checkpoint}")
    folder = tmp_path_factory.mktemp("official")
    vae = folder / "kl_tiny.ckpt"
    torch.save({"model": tiny_vae(ch=32, norm_groups=32).state_dict()}, vae)  # the 32 groups load_vae assumes
    stats = folder / "tiny.nc"
    record = subprocess.run([sys.executable, "-m", "lazymar.cli", "record", "--model", str(checkpoint), "--num-iter", "4",
                             "--cfg", "2.0", "--num-samples", "2", "--seed", "0", "--out", str(stats), "--no-progress"],
                            capture_output=True, text=True, timeout=600)
    assert record.returncode == 0, record.stderr[-3000:]
    return {"MODEL": str(checkpoint), "VAE": str(vae), "STATS": str(stats), "folder": folder}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_an_official_checkpoint_with_a_vae(path, official_tiny, tmp_path):
    """Each notebook's code paths on an official-format checkpoint (MODEL a path, VAE a path, DEVICE, ARCH):
    recording, live capture, the explorer's measured check and save, the schedules and ablations of 04."""
    if os.environ.get("LAZYMAR_SKIP_NOTEBOOKS") == "1":
        pytest.skip("LAZYMAR_SKIP_NOTEBOOKS=1")
    if importlib.util.find_spec("ipykernel") is None:
        pytest.skip("ipykernel is not installed")
    from analysis.run_notebook import execute
    values = {"MODEL": official_tiny["MODEL"], "VAE": official_tiny["VAE"], "STATS": official_tiny["STATS"],
              "DEVICE": "cpu", "ARCH": None, "FIGURES": str(tmp_path / "figures"), **OFFICIAL_PARAMETERS[path.stem]}
    if path.stem == "03_cache_schedules":
        values["SAVE_TO"] = str(tmp_path / "saved.json")
    if path.stem == "04_paper_figures":
        values["SCHEDULES"] = str(tmp_path)
    nb = inject_parameters(read_notebook(path.with_suffix(".py")), values)
    if path.stem == "03_cache_schedules":
        nb.cells.append(nbformat.v4.new_code_cell(CHECK_CELL))
    before = _git_status()
    execute(nb, timeout=TIMEOUT_S, progress=False)
    assert _git_status() == before, f"{path.name} changed the checkout"
    written = {p.name for p in (tmp_path / "figures").iterdir()} if (tmp_path / "figures").is_dir() else set()
    if path.stem == "03_cache_schedules":
        assert (tmp_path / "saved.json").is_file() and (tmp_path / "saved.md").is_file()
    else:
        assert any(name.endswith(".png") for name in written), f"{path.name} saved no figure"
