"""`ksuit ls`, `ksuit inspect`, `ksuit verify`: what a run holds, what a file holds, and
whether every checkpoint set of a run is whole.

Exit codes: 0 all good; 1 a set or file is incomplete, corrupt or unsafe (including a damaged
manifest, or a checkpoint name that is a symbolic link, FIFO or device); 2 the arguments are
wrong (missing folder or file, not a run folder). Errors are one line on stderr, no traceback.
Names and values from the folder are data: printed with control characters and undecodable
bytes escaped, and metadata values cut to `MAX_VALUE_CHARS`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ksuit.cli import app
from ksuit.readers import find_checkpoint_dir, list_checkpoints, scan_sets
from ksuit.readers.listing import folder_problems
from ksuit.storage import CorruptCheckpointError, UnsafeCheckpointError, load_file, read_metadata
from ksuit.storage.transaction import folder_lock, recover_folder

T = TypeVar("T")
MAX_VALUE_CHARS = 2000


def printable(text: object, limit: int = MAX_VALUE_CHARS) -> str:
    """`text` safe for a terminal: undecodable bytes and control characters escaped, cut to
    `limit` characters (names come from an untrusted folder)."""
    text = str(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if not text.isprintable():
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more characters)"


def _console() -> Console:
    # wide when not a terminal, so names are never cut in pipes, logs and tests
    return Console(width=None if sys.stdout.isatty() else 240, highlight=False)


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"error: {printable(message)}", err=True)
    return typer.Exit(code)


def _call(fn: Callable[[], T]) -> T:
    """Runs `fn`; a usage problem (missing/wrong folder or file) exits 2 with its message."""
    try:
        return fn()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError) as e:
        raise _fail(str(e).splitlines()[0] if str(e) else type(e).__name__, 2) from None
    except OSError as e:
        raise _fail(f"{e.filename or ''} {e.strerror or e}".strip(), 2) from None


def human_bytes(n: int) -> str:
    """`1536` -> `1.5 KiB`."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


@app.command("ls")
def ls_command(run_dir: Path = typer.Argument(..., help="run folder (<output_root>/<run_id>)")) -> None:
    """List every checkpoint file of a run: model, tag, kind, iteration and size."""
    infos = _call(lambda: list_checkpoints(run_dir))
    folder = _call(lambda: find_checkpoint_dir(run_dir))
    problems = _call(lambda: folder_problems(folder))
    table = Table(title=escape(printable(folder)))
    for column in ("model", "tag", "kind", "iteration", "format"):
        table.add_column(column)
    table.add_column("size", justify="right")
    for info in infos:
        it = str(info.training_iteration) if info.training_iteration is not None else "?"
        model = f"{info.model_name} ({info.info})" if info.info else info.model_name
        # names and tags are data, not rich markup ('[' would be taken for a style)
        cells = (model, info.tag, info.kind, it, info.format)
        table.add_row(*(escape(printable(c)) for c in cells), human_bytes(info.size_bytes))
    console = _console()
    console.print(table)
    total = sum(i.size_bytes for i in infos)
    console.print(f"{len(infos)} files, total {human_bytes(total)} ({total} bytes)")
    for name, problem in sorted(problems.items()):
        console.print(f"problem: {printable(name)}: {printable(problem)}", markup=False)
    if problems:
        console.print(f"{len(problems)} problems; `ksuit verify` checks every set", markup=False)
        raise typer.Exit(1)


def _tensor_rows(obj: Any, path: tuple = ()) -> Iterator[tuple[tuple, list[int], str, int]]:
    """`(name parts, shape, dtype, bytes)` for every tensor description in read_metadata's output
    (names are joined only for the rows shown: a deep path of long keys stays cheap)."""
    if isinstance(obj, dict) and set(obj) == {"shape", "dtype", "nbytes"}:
        yield (path, obj["shape"], obj["dtype"], obj["nbytes"])
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _tensor_rows(value, (*path, key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _tensor_rows(value, (*path, i))


def _dotted(parts: tuple) -> str:
    return ".".join(printable(p, 200) for p in parts)


def _has_tensor(obj: Any) -> bool:
    return next(_tensor_rows(obj), None) is not None


@app.command("inspect")
def inspect_command(
    file: Path = typer.Argument(..., help="a checkpoint file (.th or .safetensors)"),
    max_tensors: int = typer.Option(200, help="show at most this many tensors (0: all)"),
) -> None:
    """Show a checkpoint file's metadata and its tensors (name, shape, dtype, bytes).

    Tensor data is never read: `.th` files are memory-mapped and safetensors files are read up
    to their header. Files are loaded with weights_only=True only; an unsafe file is refused.
    """
    if not file.is_file():
        raise _fail(
            f"{file} is not a file; pass a checkpoint file such as <run>/checkpoints/x_cp=latest_model.th", 2
        )
    try:
        meta = read_metadata(file)
    except (CorruptCheckpointError, UnsafeCheckpointError) as e:
        raise _fail(str(e).splitlines()[0], 1) from None
    console = _console()
    console.print(f"[bold]{escape(printable(file))}[/bold] ({human_bytes(file.stat().st_size)})")
    if isinstance(meta, dict):
        for key, value in meta.items():
            if not _has_tensor(value):
                console.print(f"  {printable(key)}: {printable(repr(value))}", markup=False)
    rows = list(_tensor_rows(meta))
    table = Table(title=f"{len(rows)} tensors")
    table.add_column("name")
    table.add_column("shape")
    table.add_column("dtype")
    table.add_column("bytes", justify="right")
    shown = rows if max_tensors <= 0 else rows[:max_tensors]
    for name, shape, dtype, nbytes in shown:
        cells = (_dotted(name), printable(tuple(shape), 200), printable(dtype, 40))
        table.add_row(*(escape(c) for c in cells), str(nbytes))
    console.print(table)
    if len(shown) < len(rows):
        console.print(f"... {len(rows) - len(shown)} more tensors (--max-tensors 0 shows all)")
    console.print(f"tensor bytes: {human_bytes(sum(r[3] for r in rows))}")


@app.command("verify")
def verify_command(run_dir: Path = typer.Argument(..., help="run folder (<output_root>/<run_id>)")) -> None:
    """Check every checkpoint set of a run: presence, sizes, checksums and loadability.

    Interrupted saves are first completed or discarded (recovery); a save in flight in a
    training process finishes first, and the next one waits until verify is done. Exit code 1
    when any set is incomplete or any file is corrupt or unsafe, 0 otherwise.
    """
    folder = _call(lambda: find_checkpoint_dir(run_dir))
    # a save in flight (another process) finishes first, and none starts while we read
    with folder_lock(folder):
        report = _call(lambda: recover_folder(folder))
        sets = _call(lambda: scan_sets(folder, checksum=True))
        for s in sets:
            for name, info in sorted(s.files.items()):
                if name in s.problems:
                    continue
                try:
                    load_file(
                        info.path, map_location="cpu", mmap=info.format == "torch", follow_symlinks=False
                    )
                except (CorruptCheckpointError, UnsafeCheckpointError, OSError) as e:
                    s.problems[name] = str(e).splitlines()[0] if str(e) else type(e).__name__
                except Exception as e:  # a reader bug must not hide the other sets' verdicts
                    s.problems[name] = f"cannot be loaded: {type(e).__name__}: {str(e)[:200]}"
    console = _console()
    if report.rolled_forward or report.removed_temps:
        console.print(
            f"recovery: completed {len(report.rolled_forward)} interrupted renames, "
            f"removed {len(report.removed_temps)} temporary files"
        )
    for problem in report.problems:  # e.g. a read-only copy: reported, the sets are still checked
        console.print(f"recovery: {printable(problem)}", markup=False, soft_wrap=True)
    table = Table(title=escape(printable(folder)))
    for column in ("group", "tag", "iteration", "files"):
        table.add_column(column)
    table.add_column("size", justify="right")
    table.add_column("status")
    for s in sets:
        it = s.training_iteration
        table.add_row(
            escape(printable(s.group)),
            escape(printable(s.tag)),
            str(it) if it is not None else "?",
            str(len(s.manifest.files) if s.manifest else len(s.files)),
            human_bytes(s.size_bytes),
            "OK" if s.ok else "[red]BAD[/red]",
        )
    console.print(table)
    bad = [s for s in sets if not s.ok]
    for s in bad:
        for name, problem in s.problems.items():
            console.print(
                f"{printable(s.group)}@{printable(s.tag)}: {printable(name)}: {printable(problem)}",
                markup=False,
            )
    console.print(f"{len(sets)} sets, {len(bad)} with problems")
    if bad:
        raise typer.Exit(1)
