"""The import structure of lazymar and analysis: no module takes part in an import cycle, and no module imports from
a layer above its own (the contracts of .importlinter, checked by import-linter). The last tests write small packages
into tmp_path and show that both checks fail when a cycle or an upward import is added."""
from __future__ import annotations

import configparser
import re
import sys
import textwrap
from pathlib import Path

import grimp
import pytest
from importlinter.cli import EXIT_STATUS_SUCCESS, lint_imports

ROOT = Path(__file__).resolve().parents[1]
CONTRACTS = ROOT / ".importlinter"
PACKAGES = ("lazymar", "analysis")


def import_cycles(*packages: str) -> list[list[str]]:
    """Every group of modules that import each other, directly or through others (the strongly connected components
    of the import graph with more than one module, or a module that imports itself), each sorted."""
    graph = grimp.build_graph(*packages, cache_dir=None)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in sorted(graph.modules)}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []
    for root in edges:  # Tarjan's algorithm, iteratively (no recursion limit on deep chains)
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = len(index)
        stack.append(root), on_stack.add(root)
        while work:
            module, successors = work[-1]
            nxt = next(successors, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt), on_stack.add(nxt)
                    work.append((nxt, iter(edges[nxt])))
                elif nxt in on_stack:
                    low[module] = min(low[module], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[module])
            if low[module] == index[module]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == module:
                        break
                if len(group) > 1 or module in edges[module]:
                    groups.append(sorted(group))
    return sorted(groups)


def broken_contracts(config: Path, capsys) -> str:
    """import-linter's report on the contracts of ``config`` when one is broken, else ""."""
    capsys.readouterr()
    path = list(sys.path)
    try:
        status = lint_imports(config_filename=str(config), no_cache=True, no_logo=True)
    finally:
        sys.path[:] = path  # lint_imports puts the working directory first on the import path
    report = capsys.readouterr().out
    return "" if status == EXIT_STATUS_SUCCESS else report


def layer_modules(config: Path, contract: str) -> set[str]:
    """The modules named by the layers of ``contract`` in ``config``."""
    parser = configparser.ConfigParser()
    parser.read(config)
    layers = parser[f"importlinter:contract:{contract}"]["layers"]
    return {name.strip() for line in layers.splitlines() for name in re.split(r"[|:]", line) if name.strip()}


def child_modules(package: Path) -> set[str]:
    """The modules and subpackages directly inside the package folder ``package``."""
    return ({p.stem for p in package.glob("*.py") if p.name != "__init__.py"}
            | {p.name for p in package.iterdir() if (p / "__init__.py").is_file()})


# --- the repository's own code ------------------------------------------------------------------------------
def test_no_module_takes_part_in_an_import_cycle():
    cycles = import_cycles(*PACKAGES)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(group) for group in cycles)


def test_the_layer_contracts_are_kept(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    report = broken_contracts(CONTRACTS, capsys)
    assert not report, report


@pytest.mark.parametrize("contract, package", [("lazymar-layers", "lazymar"), ("recording-layers", "lazymar/recording"),
                                               ("analysis-layers", "analysis")])
def test_every_module_has_a_layer(contract, package):
    """A module in no layer would escape the contract: a new module must be placed in .importlinter."""
    missing = child_modules(ROOT / package) - layer_modules(CONTRACTS, contract)
    assert not missing, f"{', '.join(sorted(missing))}: in no layer of the contract {contract!r} (.importlinter)"


# --- the checks fail when they should ---------------------------------------------------------------------------
def write_package(root: Path, name: str, modules: dict[str, str]) -> None:
    """A package ``name`` under ``root`` with the given module sources."""
    (root / name).mkdir()
    (root / name / "__init__.py").write_text("")
    for module, source in modules.items():
        (root / name / f"{module}.py").write_text(textwrap.dedent(source))


LAYERED = """\
    [importlinter]
    root_packages =
        {name}

    [importlinter:contract:layers]
    name = {name} layers
    type = layers
    containers = {name}
    layers =
        top
        middle
        bottom
"""


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """tmp_path on the import path; the packages written there are forgotten afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        del sys.modules[name]


def test_a_clean_package_passes_both_checks(scratch, capsys):
    write_package(scratch, "clean_layers", {"bottom": "X = 1\n", "middle": "from .bottom import X\n",
                                            "top": "from .middle import X\n"})
    (scratch / "clean.ini").write_text(textwrap.dedent(LAYERED.format(name="clean_layers")))
    assert import_cycles("clean_layers") == []
    assert broken_contracts(scratch / "clean.ini", capsys) == ""


def test_an_import_cycle_is_found(scratch):
    write_package(scratch, "cyclic_pkg", {"a": "from . import b\n", "b": "from . import c\n",
                                          "c": "def late():\n    from . import a\n", "d": "from . import a\n"})
    assert import_cycles("cyclic_pkg") == [["cyclic_pkg.a", "cyclic_pkg.b", "cyclic_pkg.c"]]


def test_an_import_cycle_breaks_the_contract(scratch, capsys):
    write_package(scratch, "cyclic_layers", {"bottom": "from . import top\n", "middle": "from . import bottom\n",
                                             "top": "from . import middle\n"})
    (scratch / "cyclic.ini").write_text(textwrap.dedent(LAYERED.format(name="cyclic_layers")))
    report = broken_contracts(scratch / "cyclic.ini", capsys)
    assert "cyclic_layers.bottom is not allowed to import cyclic_layers.top" in report


def test_an_upward_import_breaks_the_contract(scratch, capsys):
    """No cycle, but a lower layer imports a higher one (inside a function, as a late import would)."""
    write_package(scratch, "upward_layers", {"bottom": "def f():\n    from .top import g\n",
                                             "middle": "X = 1\n", "top": "def g():\n    pass\n"})
    (scratch / "upward.ini").write_text(textwrap.dedent(LAYERED.format(name="upward_layers")))
    assert import_cycles("upward_layers") == []
    report = broken_contracts(scratch / "upward.ini", capsys)
    assert "upward_layers.bottom is not allowed to import upward_layers.top" in report
