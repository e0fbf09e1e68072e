"""The optional frameworks an integration needs, with the error that says how to install them."""

from __future__ import annotations

import importlib


def require(module: str, extra: str, integration: str) -> None:
    """Imports `module` or raises an ImportError naming the integration and the extra to install."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{integration} needs the '{module}' package, which cannot be imported ({e}); "
            f"install it with: pip install 'ksuit[{extra}]'"
        ) from e
