"""`ksuit` command line: thin wrappers over the library, no logic of their own.

Every command is a plain function in its module (`train`, `listing`, `export`, `retention`),
registered on `app` here, explicitly. Options of `ksuit` itself (`--storage-option`,
`ksuit.cli.storage_options`) apply to every command.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from ksuit.cli.export import export_command
from ksuit.cli.listing import inspect_command, ls_command, verify_command
from ksuit.cli.retention import pin_command, prune_command, unpin_command
from ksuit.cli.storage_options import HELP, OPTION, apply_storage_options, hoist_storage_options
from ksuit.cli.train import train_command

app = typer.Typer(
    name="ksuit",
    help="Structured, crash-safe, fast checkpoints for PyTorch training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def ksuit_options(
    storage_option: Annotated[
        list[str] | None, typer.Option(OPTION, metavar="KEY=VALUE", help=HELP, show_default=False)
    ] = None,
) -> None:
    """Structured, crash-safe, fast checkpoints for PyTorch training."""
    apply_storage_options(storage_option)


app.command("train")(train_command)
app.command("ls")(ls_command)
app.command("inspect")(inspect_command)
app.command("verify")(verify_command)
app.command("export")(export_command)
app.command("prune")(prune_command)
app.command("pin")(pin_command)
app.command("unpin")(unpin_command)


def main() -> None:
    app(args=hoist_storage_options(sys.argv[1:]), prog_name="ksuit")
