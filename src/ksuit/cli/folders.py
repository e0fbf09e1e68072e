"""`ksuit ls` and `ksuit verify` of checkpoint folders another framework wrote and ksuit marked
complete (`ksuit.readers.folders`): one row per folder, its step, files, size and status."""

from __future__ import annotations

import typer
from rich.markup import escape
from rich.table import Table

from ksuit.cli.output import EXIT_BAD_CHECKPOINT, console, printable
from ksuit.readers.folders import CheckpointFolder
from ksuit.utils.units import human_bytes


def print_folders(location: str, folders: list[CheckpointFolder], verified: bool) -> None:
    """The table of `folders`; with `verified` (checksums read) every problem too, and exit 1
    when any folder is incomplete. `ksuit ls` (sizes only) reports incomplete folders too."""
    table = Table(title=escape(printable(location)))
    for column in ("folder", "iteration", "files"):
        table.add_column(column)
    table.add_column("size", justify="right")
    table.add_column("status")
    for f in folders:
        it = f.training_iteration
        table.add_row(
            escape(printable(f.name)),
            str(it) if it is not None else "?",
            str(len(f.manifest.files)) if f.manifest is not None else "?",
            human_bytes(f.size_bytes),
            "complete" if f.ok else "[red]INCOMPLETE[/red]",
        )
    out = console()
    out.print(table)
    bad = [f for f in folders if not f.ok]
    for f in bad:
        for name, problem in f.problems.items():
            out.print(f"{printable(f.name)}: {printable(name)}: {printable(problem)}", markup=False)
    what = "checksums verified" if verified else "sizes checked; `ksuit verify` reads every byte"
    out.print(f"{len(folders)} checkpoint folders, {len(bad)} incomplete ({what})")
    if bad:
        raise typer.Exit(EXIT_BAD_CHECKPOINT)
