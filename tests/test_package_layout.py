"""The installed package is the optimizer only; benchmarks/ is a separate, uninstalled folder.

The package sources are read as syntax trees (not imported), so an import
hidden in a function body counts too.
"""

import ast
import importlib
import os
import runpy

import pytest
import setuptools

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "kfac_keras")
BENCHMARKS = os.path.join(REPO, "benchmarks")

#: The longest a module of the package may be (issue 13): past it, a module
#: does several jobs and one of them belongs in a module of its own.
MAX_MODULE_LINES = 600

#: Modules the optimizer package must not import: command-line parsing and
#: plotting belong to benchmarks/, which is not installed.
FORBIDDEN = ("argparse", "matplotlib", "benchmarks")


def _python_files(folder):
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(root, name)


def _imported_modules(path):
    with open(path) as f:
        tree = ast.parse(f.read(), filename=path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def _forbidden_imports(path):
    return sorted({name for name in _imported_modules(path)
                   if name.split(".")[0] in FORBIDDEN})


def test_forbidden_import_finder_sees_imports_inside_functions(tmp_path):
    path = tmp_path / "module.py"
    path.write_text("import os\n\ndef f():\n    import argparse\n"
                    "    from matplotlib import pyplot\n    from benchmarks.cli import x\n")
    assert _forbidden_imports(str(path)) == ["argparse", "benchmarks.cli", "matplotlib"]


def test_package_imports_no_cli_plotting_or_benchmark_module():
    found = {os.path.relpath(path, REPO): _forbidden_imports(path)
             for path in _python_files(PACKAGE)}
    assert len(found) > 10  # the walk found the package
    assert {path: names for path, names in found.items() if names} == {}


def test_no_package_module_exceeds_the_line_limit():
    lengths = {}
    for path in _python_files(PACKAGE):
        with open(path) as f:
            lengths[os.path.relpath(path, REPO)] = sum(1 for _ in f)
    assert len(lengths) > 10  # the walk found the package
    assert {path: n for path, n in lengths.items() if n > MAX_MODULE_LINES} == {}


def test_package_holds_no_benchmarks_or_data_loaders():
    # Only sources count: an old checkout may keep an empty folder or __pycache__.
    assert list(_python_files(os.path.join(PACKAGE, "examples"))) == []
    assert not os.path.exists(os.path.join(PACKAGE, "datasets.py"))


def test_setup_installs_the_package_without_benchmarks(monkeypatch):
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    monkeypatch.chdir(REPO)
    runpy.run_path(os.path.join(REPO, "setup.py"), run_name="__main__")
    packages = captured["packages"]
    assert "kfac_keras" in packages and "kfac_keras.blocks" in packages
    assert all(p == "kfac_keras" or p.startswith("kfac_keras.") for p in packages), packages


@pytest.mark.parametrize("name", sorted(
    os.path.basename(path)[:-len(".py")] for path in _python_files(BENCHMARKS)
    if os.path.dirname(path) == BENCHMARKS and not path.endswith("__init__.py")))
def test_every_benchmark_module_imports_from_the_repository_root(name):
    module = importlib.import_module(f"benchmarks.{name}")
    assert os.path.dirname(module.__file__) == BENCHMARKS
