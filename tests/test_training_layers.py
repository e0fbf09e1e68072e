"""The training layer's import rules hold in code: no runtime import goes upward.

Imports under `if TYPE_CHECKING:` only serve annotations and are allowed; imports inside
functions run, so they count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def runtime_imports(path: Path) -> set[str]:
    """The ksuit modules `path` imports when it runs (TYPE_CHECKING blocks left out)."""
    tree = ast.parse(path.read_text())
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "ksuit" or name.startswith("ksuit.")}


def modules(package: str) -> list[Path]:
    folder = SRC.joinpath(*package.split("."))
    return sorted(folder.rglob("*.py")) if folder.is_dir() else [folder.with_suffix(".py")]


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("ksuit.utils.distributed", ("ksuit",)),  # domain: torch only
        ("ksuit.callbacks", ("ksuit.trainers", "ksuit.initializers", "ksuit.cli")),
        ("ksuit.readers", ("ksuit.trainers", "ksuit.callbacks", "ksuit.initializers", "ksuit.cli")),
        ("ksuit.writers", ("ksuit.trainers", "ksuit.callbacks", "ksuit.initializers", "ksuit.cli")),
        ("ksuit.zoo", ("ksuit.trainers", "ksuit.callbacks", "ksuit.writers", "ksuit.readers")),
    ],
)
def test_no_runtime_import_goes_upward(package, forbidden):
    files = modules(package)
    assert files, f"no modules found for {package}"
    upward = {
        f"{path.relative_to(SRC)} imports {name}"
        for path in files
        for name in runtime_imports(path)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    }
    assert not upward, sorted(upward)
