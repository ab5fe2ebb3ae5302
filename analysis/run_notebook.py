"""Run a workbook notebook with parameters, the one place that does it (the CLI, and tests/test_notebooks.py).

As papermill does, a cell that sets the given names is injected right after the notebook's ``parameters`` cell;
it also changes into notebooks/, so that the notebook's relative default paths resolve as they do by hand. Values
are Python literals (``--set MODEL='"digits16"'``); each is checked with :func:`ast.literal_eval`, and each name
must be assigned in the parameters cell, before anything runs.

    python -m analysis.run_notebook notebooks/04_paper_figures.py --set MODEL='"digits16"' \\
        --set FIGURES='"../data/figures/digits16"' --out /tmp/04_digits16.ipynb
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import nbformat

from lazymar.errors import LazymarError

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}


class NotebookParameterError(LazymarError):
    """A parameter the notebook does not have, or a value that is not a Python literal."""


def _parameters_cell(nb) -> int:
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []):
            return i
    raise NotebookParameterError("the notebook has no code cell tagged 'parameters'")


def parameter_names(nb) -> list[str]:
    """The names the notebook's parameters cell assigns, in order."""
    tree = ast.parse(nb.cells[_parameters_cell(nb)].source)
    names = []
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
            if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
        names += [t.id for t in targets if isinstance(t, ast.Name) and t.id not in names]
    return names


def parse_assignment(text: str) -> tuple[str, Any]:
    """``NAME=literal`` as (name, value); a value that is not a Python literal is an error naming it."""
    name, sep, literal = text.partition("=")
    name = name.strip()
    if not sep or not name.isidentifier():
        raise NotebookParameterError(f"--set {text!r}: expected NAME=VALUE (VALUE a Python literal)")
    try:
        return name, ast.literal_eval(literal.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise NotebookParameterError(
            f"--set {name}: {literal.strip()!r} is not a Python literal (quote strings: {name}='\"text\"')") from None


def read_notebook(path: str | Path):
    """A notebook from its percent-format source (.py) or its .ipynb, with the python3 kernel named."""
    import jupytext
    path = Path(path)
    if not path.is_file():
        raise NotebookParameterError(f"notebook not found: {path}")
    nb = jupytext.read(path)
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    return nb


def inject_parameters(nb, values: Mapping[str, Any], cwd: str | Path = NOTEBOOK_DIR):
    """``nb`` with a cell after its parameters cell that changes into ``cwd`` and sets ``values`` (names checked
    against the parameters cell); the notebook is changed in place and returned."""
    known = parameter_names(nb)
    unknown = [name for name in values if name not in known]
    if unknown:
        raise NotebookParameterError(f"the notebook has no parameter {unknown[0]!r}; its parameters cell sets "
                                     f"{', '.join(known)}")
    lines = ["import os", f"os.chdir({str(cwd)!r})"] + [f"{name} = {value!r}" for name, value in values.items()]
    nb.cells.insert(_parameters_cell(nb) + 1, nbformat.v4.new_code_cell(
        "\n".join(lines), metadata={"tags": ["injected-parameters"]}))
    return nb


def execute(nb, cwd: str | Path = NOTEBOOK_DIR, timeout: Optional[int] = None, progress: bool = True):
    """Run every cell of ``nb`` in a fresh python3 kernel started in ``cwd`` with the repository on PYTHONPATH;
    a tqdm bar counts the code cells. Raises nbclient's CellExecutionError on the first failing cell."""
    from nbclient import NotebookClient
    from tqdm.auto import tqdm
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    code = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code" and cell.source.strip()]
    bar = tqdm(total=len(code), unit="cell", disable=not progress, file=sys.stderr)

    def started(cell, cell_index, **_):  # nbclient calls it for every cell, but runs only non-empty code cells
        if cell_index not in code:
            return
        first_line = (cell.source.strip().splitlines() or [""])[0]
        bar.set_postfix_str(f"cell {cell_index}: {first_line[:40]}")

    client = NotebookClient(nb, timeout=timeout, kernel_name=KERNELSPEC["name"],
                            resources={"metadata": {"path": str(cwd)}},
                            on_cell_start=started, on_cell_executed=lambda **_: bar.update(1))
    try:
        client.execute()
    finally:
        bar.close()
    return nb


def run_notebook(path: str | Path, values: Mapping[str, Any], out: Optional[str | Path] = None,
                 timeout: Optional[int] = None, progress: bool = True):
    """Read ``path``, inject ``values``, execute it from notebooks/ and (with ``out``) write the executed .ipynb."""
    nb = inject_parameters(read_notebook(path), values)
    try:
        execute(nb, timeout=timeout, progress=progress)
    finally:
        if out is not None:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, str(out))
    return nb


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.run_notebook",
        description="Execute a workbook notebook (its .py source or .ipynb) from notebooks/ with parameters set "
                    "after its parameters cell, as papermill does. Shows a progress bar over the code cells.")
    parser.add_argument("notebook", help="notebooks/NN_name.py or .ipynb")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="NAME=VALUE",
                        help="set a parameter to a Python literal, e.g. --set MODEL='\"digits16\"' (repeatable)")
    parser.add_argument("--out", default=None, help="write the executed notebook here (default: not kept)")
    parser.add_argument("--timeout", type=int, default=None, help="seconds per cell (default: no limit)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    prog = parser.prog
    from nbclient.exceptions import CellExecutionError
    start = time.perf_counter()
    try:
        values = dict(parse_assignment(a) for a in args.assignments)
        run_notebook(args.notebook, values, out=args.out, timeout=args.timeout, progress=not args.no_progress)
    except LazymarError as err:  # checked before a kernel starts
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except CellExecutionError as err:
        print(f"{prog}: error: {args.notebook} failed: {err.ename}: {err.evalue}"
              + (f" (executed notebook in {args.out})" if args.out else " (keep it with --out to see where)"),
              file=sys.stderr)
        return 1
    print(f"{args.notebook}: ran in {time.perf_counter() - start:.0f} s"
          + (f"; executed notebook in {args.out}" if args.out else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
