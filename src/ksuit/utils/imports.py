"""Resolving `module.QualName` strings to objects (config kinds, model kinds, optimizers)."""

from __future__ import annotations

import importlib
from typing import Any


def import_path(obj: Any) -> str:
    """`module.QualName` of a class (or of an instance's class)."""
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def resolve_import_path(path: str, what: str = "class") -> Any:
    """Imports `a.b.C` (or `a.b.Outer.Inner`); errors say which part failed and how to fix it."""
    if not isinstance(path, str) or "." not in path:
        raise ValueError(f"{what} {path!r} is not an import path; expected 'package.module.ClassName'")
    parts = path.split(".")
    last_error: Exception | None = None
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is not None and not module_name.startswith(e.name) and e.name != module_name:
                raise ImportError(f"{what} {path!r}: importing {module_name} failed: {e}") from e
            last_error = e
            continue
        try:
            for attr in parts[split:]:
                obj = getattr(obj, attr)
        except AttributeError as e:
            raise ImportError(
                f"{what} {path!r} does not exist: module {module_name!r} has no {'.'.join(parts[split:])!r}; "
                "was it renamed or moved? install the code that defines it or fix the path"
            ) from e
        return obj
    raise ImportError(
        f"{what} {path!r} cannot be imported (no module {parts[0]!r} found); "
        "install the package that defines it or fix the path"
    ) from last_error
