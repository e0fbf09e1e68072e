"""`ksuit export FILE --to safetensors|torch`: convert a weights file, next to the original; a
sharded checkpoint folder (`.dcp`) is consolidated into one file, streaming tensor by tensor.

The new file is standalone: it joins no checkpoint set, so the set it came from stays exactly
what its save wrote. A source listed in a manifest is checked against it first, so a damaged
file is never copied into one that no manifest can catch.

Exit codes (`ksuit.cli.output`): 0 written; 1 the source is corrupt or unsafe to load; 2 the
arguments are wrong (missing file, target exists, a file that cannot be converted).
"""

from __future__ import annotations

import enum
from typing import Annotated

import typer

from ksuit.cli.output import exit_on_errors, printable
from ksuit.layout import is_sharded_filename
from ksuit.readers.model_loading import check_opened, check_sharded
from ksuit.storage import split_file_location
from ksuit.storage.convert import convert_file


class TargetFormat(enum.StrEnum):
    safetensors = "safetensors"
    torch = "torch"


def export_command(
    file: Annotated[
        str,
        typer.Argument(help="a weights file (*_model.th, *_model.safetensors) or a sharded folder (*.dcp)"),
    ],
    to: Annotated[TargetFormat, typer.Option("--to", help="the target format")],
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="target path (default: next to FILE)")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing target file")] = False,
) -> None:
    """Convert a weights file between .th and .safetensors (atomically; tensors bit for bit), or
    consolidate a sharded checkpoint folder (.dcp) into one such file (no process group needed;
    extra memory at most its largest tensor plus 64 MiB).

    The new file is standalone (no manifest lists it); the source's set is left as it was.
    """
    with exit_on_errors():
        folder, name = split_file_location(file.rstrip("/"))
        if is_sharded_filename(name):
            check_sharded(folder, name)
        else:
            with folder.open(name, follow_symlinks=True) as f:
                check_opened(f, folder)
        written = convert_file(folder.file_location(name), to.value, output=output, overwrite=force)
    typer.echo(f"wrote {printable(written.location)} ({written.size} bytes)")
