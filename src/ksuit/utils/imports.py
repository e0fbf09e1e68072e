"""Resolving `module.QualName` strings to objects (config kinds, model kinds, optimizers).

Two trust levels. `resolve_import_path` is for strings the user wrote (a run config, code): it
imports whatever module they name. `resolve_kind_from_file` is for strings read from a file (a
checkpoint's `config_kind`, its model config's `kind`): a file must not choose which code runs,
so it only finds classes in modules that are already imported, or imports modules the caller
trusts by name (`trusted_modules`), and never a `__main__` module.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Iterable
from typing import Any

# an import path longer than this is no class name but a hostile or damaged file
_MAX_PATH = 1000


def import_path(obj: Any) -> str:
    """`module.QualName` of a class (or of an instance's class)."""
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def resolve_import_path(path: str, what: str = "class") -> Any:
    """Imports `a.b.C` (or `a.b.Outer.Inner`); errors say which part failed and how to fix it.

    Only for paths the user wrote; a path read from a file goes through `resolve_kind_from_file`.
    """
    if not isinstance(path, str) or "." not in path:
        raise ValueError(f"{what} {path!r} is not an import path; expected 'package.module.ClassName'")
    parts = path.split(".")
    last_error: Exception | None = None
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if _failed_inside(e, module_name):
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


def _failed_inside(error: ModuleNotFoundError, module_name: str) -> bool:
    """Whether importing `module_name` failed on a missing module other than it or a parent of it
    (a broken dependency, not a wrong path)."""
    return error.name is not None and not module_name.startswith(error.name) and error.name != module_name


def trusted_prefixes(trusted_modules: str | Iterable[str] | None) -> tuple[str, ...]:
    """`trusted_modules` as a tuple of module names; one str is one module name."""
    if trusted_modules is None:
        return ()
    if isinstance(trusted_modules, str):
        trusted_modules = [trusted_modules]
    prefixes = []
    for prefix in trusted_modules:
        if not isinstance(prefix, str) or not _is_dotted_name(prefix):
            raise ValueError(
                f"trusted_modules entry {prefix!r} is not a module name; pass names such as 'mypkg' or "
                "'mypkg.models' (a module and its submodules are trusted)"
            )
        if "__main__" in prefix.split("."):
            raise ValueError(f"trusted_modules entry {prefix!r}: a __main__ module is never imported")
        prefixes.append(prefix)
    return tuple(prefixes)


def _is_dotted_name(text: str) -> bool:
    return all(part.isidentifier() for part in text.split("."))


def is_trusted_module(module_name: str, prefixes: tuple[str, ...]) -> bool:
    """Whether `module_name` is one of `prefixes` or a submodule of one, on dot boundaries
    (`mypkg` trusts `mypkg.models`, not `mypkg2`). A `__main__` module is never trusted."""
    if "__main__" in module_name.split("."):
        return False
    return any(module_name == p or module_name.startswith(p + ".") for p in prefixes)


def _find_loaded(parts: list[str]) -> Any:
    """The object `parts` names inside a module that is already imported, looked up in
    `__dict__`s only (no module `__getattr__` or descriptor runs); None when there is none."""
    for split in range(len(parts) - 1, 0, -1):
        obj: Any = sys.modules.get(".".join(parts[:split]))
        for attr in parts[split:]:
            if not isinstance(obj, (types.ModuleType, type)):
                obj = None
                break
            obj = vars(obj).get(attr)
        if obj is not None:
            return obj
    return None


def resolve_kind_from_file(
    path: object,
    base: type,
    source: str,
    trusted_modules: str | Iterable[str] | None = None,
    what: str = "class",
) -> type:
    """The class a file names as `module.QualName`, checked to be a subclass of `base`.

    `source` starts every error message (e.g. "cannot rebuild the model of <file>").

    The class must live in a module that is already imported, or in one of `trusted_modules`
    (a module or its submodules), which is then imported; a `__main__` module is never
    imported. The error for anything else names the class and how to allow it. Nothing is
    instantiated here.
    """
    prefixes = trusted_prefixes(trusted_modules)
    if not isinstance(path, str) or len(path) > _MAX_PATH or "." not in path or not _is_dotted_name(path):
        shown = repr(path)[:200]
        raise ValueError(f"{source}: {what} {shown} is not an import path such as 'package.module.ClassName'")
    parts = path.split(".")
    obj = _find_loaded(parts)
    if obj is None:
        module_name = ".".join(parts[:-1])
        trusted = [
            ".".join(parts[:n])
            for n in range(1, len(parts))
            if is_trusted_module(".".join(parts[:n]), prefixes)
        ]
        if not trusted or "__main__" in parts:
            if "__main__" in parts:
                how = "a __main__ module is never imported; move the class into an importable module"
            else:
                how = f"import {module_name} first, or pass trusted_modules=['{parts[0]}']"
            raise ImportError(
                f"{source}: {what} {path!r} is in a module that is not imported ({module_name}), and ksuit "
                f"does not import a module because a file names it: {how} "
                "(if it is not installed: install the package that defines it or fix the path)"
            )
        obj = _import_trusted(path, parts, trusted, f"{source}: {what}")
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise TypeError(f"{source}: {what} {path!r} is not a {base.__qualname__} subclass")
    return obj


def _import_trusted(path: str, parts: list[str], trusted: list[str], what: str) -> Any:
    """Imports the trusted candidate modules of `path` (longest first) until the object exists."""
    last_error: Exception | None = None
    for module_name in reversed(trusted):
        try:
            importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if _failed_inside(e, module_name):
                raise ImportError(f"{what} {path!r}: importing {module_name} failed: {e}") from e
            last_error = e
            continue
        obj = _find_loaded(parts)
        if obj is not None:
            return obj
        raise ImportError(
            f"{what} {path!r} does not exist: module {module_name!r} has no "
            f"{path[len(module_name) + 1 :]!r}; was it renamed or moved? install the code that defines it "
            "or fix the path"
        )
    raise ImportError(
        f"{what} {path!r} cannot be imported (no module {trusted[0]!r} found); "
        "install the package that defines it or fix the path"
    ) from last_error
