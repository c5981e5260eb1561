"""The package's layers (rnnlm/__init__.py draws them; pyproject.toml states them as import-linter contracts):
every contract is kept, counting imports inside functions, and no module imports one of rnnlm's commands."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

COMMANDS = ("fit", "generate", "evaluate", "score", "export", "classify", "embed")


def test_the_import_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "0 broken" in done.stdout


def _rnnlm_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(module, line, inside a function) of each import of an rnnlm module in ``path``."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("rnnlm"):
                found.extend((f"{child.module}.{a.name}", child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names if a.name.startswith("rnnlm"))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


def test_no_module_imports_a_command_and_none_imports_inside_a_function():
    """Commands are faces: nothing in the package imports one. And an import inside a function would hide an
    arrow of the graph from a reader; the package has none (heavy optional libraries are not rnnlm modules)."""
    faces = {f"rnnlm.{c}" for c in COMMANDS}
    wrong = []
    for path in sorted((ROOT / "rnnlm").rglob("*.py")):
        for name, line, in_function in _rnnlm_imports(path):
            if any(name == f or name.startswith(f + ".") for f in faces):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports the command {name}")
            if in_function:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {name} inside a function")
    assert not wrong, "\n".join(wrong)
