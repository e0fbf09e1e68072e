"""`ksuit export FILE --to safetensors|torch`: convert a weights file, next to the original.

The new file is standalone: it joins no checkpoint set, so the set it came from stays exactly
what its save wrote. A source listed in a manifest is checked against it first, so a damaged
file is never copied into one that no manifest can catch.

Exit codes: 0 written; 1 the source is corrupt or unsafe to load; 2 the arguments are wrong
(missing file, target exists, a file that cannot be converted).
"""

from __future__ import annotations

from pathlib import Path

import typer

from ksuit.cli import app
from ksuit.readers.model_loading import check_against_manifest
from ksuit.storage.convert import convert_file
from ksuit.storage.errors import CorruptCheckpointError, UnsafeCheckpointError


@app.command("export")
def export_command(
    file: Path = typer.Argument(..., help="a weights file (*_model.th or *_model.safetensors)"),
    to: str = typer.Option(..., "--to", help="target format: safetensors or torch"),
    output: Path | None = typer.Option(None, "--output", "-o", help="target path (default: next to FILE)"),
    force: bool = typer.Option(False, "--force", help="replace an existing target file"),
) -> None:
    """Convert a weights file between .th and .safetensors (atomically; tensors bit for bit).

    The new file is standalone (no manifest lists it); the source's set is left as it was.
    """
    try:
        if file.is_file():
            check_against_manifest(file)
        target = convert_file(file, to, output=output, overwrite=force)
    except (UnsafeCheckpointError, CorruptCheckpointError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    except (FileNotFoundError, FileExistsError, ValueError, TypeError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {target} ({target.stat().st_size} bytes)")
