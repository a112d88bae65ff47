"""The code's shape, enforced: short functions in the science packages (docstring included),
short job modules, no package imports hidden inside science functions, numpy
docstrings on public science functions, and the import contracts of pyproject.toml."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "subtomo"
SCIENCE = ("em", "tomo", "ctf", "post")
MAX_FUNCTION_LINES = 60
MAX_JOB_MODULE_LINES = 250


def _functions(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_science_functions_are_short():
    long = []
    for package in SCIENCE:
        for path in sorted((SRC / package).rglob("*.py")):
            for fn in _functions(path):
                length = fn.end_lineno - fn.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SRC)}:{fn.lineno} {fn.name} ({length} lines)")
    assert not long, f"functions longer than {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_job_modules_are_short():
    long = [f"{p.name} ({n} lines)" for p in sorted((SRC / "jobs").glob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_JOB_MODULE_LINES]
    assert not long, f"job modules longer than {MAX_JOB_MODULE_LINES} lines: {', '.join(long)}"


def test_science_imports_sit_at_module_top():
    """Imports inside functions hide the layering from the linter; only jobs, the CLI and the GUI defer them."""
    inner = []
    for path in sorted(SRC.rglob("*.py")):
        if path.relative_to(SRC).parts[0] in ("jobs", "cli", "web"):
            continue
        for fn in _functions(path):
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("subtomo"):
                    inner.append(f"{path.relative_to(SRC)}:{node.lineno} from {node.module}")
    assert not inner, "package imports inside functions:\n" + "\n".join(inner)


@pytest.mark.skipif(shutil.which("lint-imports") is None and shutil.which("lint-imports", path=str(Path(sys.executable).parent)) is None,
                    reason="import-linter is not installed (pip install -e '.[test]' installs it)")
def test_import_contracts_hold():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    run = subprocess.run([exe, "--config", str(SRC.parents[1] / "pyproject.toml")], capture_output=True, text=True,
                         cwd=SRC.parents[1])
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


def test_public_science_functions_have_numpy_docstrings():
    """Public functions of the science packages document their parameters and results (shapes, units)."""
    missing = []
    for package in (*SCIENCE, "geometry", "io", "fourier.py"):
        paths = [SRC / package] if package.endswith(".py") else sorted((SRC / package).rglob("*.py"))
        for path in paths:
            for node in ast.parse(path.read_text()).body:
                if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                    continue
                if not [a for a in node.args.args if a.arg not in ("self", "cls")]:
                    continue
                doc = ast.get_docstring(node) or ""
                if "Parameters\n" not in doc and "Returns\n" not in doc:
                    missing.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}")
    assert not missing, "public functions without a Parameters/Returns section:\n" + "\n".join(missing)
