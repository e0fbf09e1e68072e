"""`ksuit` command line: thin wrappers over the library, no logic of their own.

Each command group lives in its own module and registers itself on `app`.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="ksuit",
    help="Structured, crash-safe, fast checkpoints for PyTorch training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# modules that add commands to `app` when imported
COMMAND_MODULES = ("ksuit.cli.train", "ksuit.cli.listing", "ksuit.cli.export")

for _module in COMMAND_MODULES:
    try:
        importlib.import_module(_module)
    except ModuleNotFoundError as e:  # a command module not written yet
        if e.name != _module:
            raise


def main() -> None:
    app()
