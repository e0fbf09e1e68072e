"""`ksuit ls`, `ksuit inspect`, `ksuit verify`: what a run holds, what a file holds, and
whether every checkpoint set of a run is whole.

Exit codes (`ksuit.cli.output`): 0 all good; 1 a set or file is incomplete, corrupt or unsafe
(including a damaged manifest or journal, or a checkpoint name that is a symbolic link, FIFO or
device); 2 the arguments are wrong (missing folder or file, not a run folder). Names and values
from the folder are data: printed with control characters and undecodable bytes escaped, and
metadata values cut to `MAX_VALUE_CHARS`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from ksuit.cli.folders import print_folders
from ksuit.cli.output import console, exit_on_errors, fail, first_line, printable
from ksuit.layout import PINS_FILENAME, SHARDED_FORMAT, is_sharded_filename
from ksuit.readers import CheckpointSet, scan_sets
from ksuit.readers.folders import checkpoint_folders
from ksuit.readers.listing import (
    FolderListing,
    checkpoint_folder,
    listed_checkpoints,
    read_folder,
    sharded_folders,
)
from ksuit.readers.sets import sets_of
from ksuit.retention import read_pins
from ksuit.storage import (
    Backend,
    CorruptCheckpointError,
    RecoveryReport,
    UnsafeCheckpointError,
    load_opened,
    read_metadata,
    split_file_location,
)
from ksuit.utils.units import human_bytes

RunDir = Annotated[str, typer.Argument(help="run folder (<output_root>/<run_id>), a path or URL")]


def ls_command(
    run_dir: RunDir,
    sizes: Annotated[
        bool,
        typer.Option("--sizes", help="also the bytes each set really holds (hard links once) and the total"),
    ] = False,
) -> None:
    """List every checkpoint file of a run: model, tag, role, iteration and size; pinned tags.

    Sizes count a file with several names (hard links: identical files of one save) once. A
    folder of checkpoint folders ksuit marked complete (a Hugging Face output folder) is listed
    folder by folder.
    """
    with exit_on_errors():
        folders = checkpoint_folders(run_dir)
    if folders is not None:
        return print_folders(run_dir, folders, verified=False)
    with exit_on_errors():
        listing = read_folder(checkpoint_folder(run_dir))
    infos = listed_checkpoints(listing)
    problems = {**listing.unreadable, **listing.irregular}
    try:
        pinned = read_pins(listing.folder)
    except CorruptCheckpointError as e:
        pinned = set()
        problems[PINS_FILENAME] = first_line(e)
    table = Table(title=escape(printable(listing.folder.location)))
    for column in ("model", "tag", "role", "iteration", "format"):
        table.add_column(column)
    table.add_column("size", justify="right")
    for info in infos:
        it = str(info.training_iteration) if info.training_iteration is not None else "?"
        model = f"{info.model_name} ({info.info})" if info.info else info.model_name
        # names and tags are data, not rich markup ('[' would be taken for a style)
        cells = (model, info.tag, info.role, it, info.format)
        table.add_row(*(escape(printable(c)) for c in cells), human_bytes(info.size_bytes))
    out = console()
    out.print(table)
    total = _bytes_once(listing, (i.name for i in infos))
    out.print(f"{len(infos)} files, total {human_bytes(total)} ({total} bytes; hard links counted once)")
    if pinned:
        out.print(f"pinned: {', '.join(printable(t) for t in sorted(pinned))}", markup=False)
    if sizes:
        _print_set_sizes(listing, pinned)
    for name, problem in sorted(problems.items()):
        out.print(f"problem: {printable(name)}: {printable(problem)}", markup=False)
    if problems:
        out.print(f"{len(problems)} problems; `ksuit verify` checks every set", markup=False)
        raise typer.Exit(1)


def _bytes_once(listing: FolderListing, names: Iterable[str]) -> int:
    """Bytes `names` hold, a file with several of the names (hard links) once."""
    held: dict[str, int] = {}
    for name in names:
        entry = listing.entries.get(name)
        if entry is not None and entry.problem is None:
            held[entry.file_id or name] = entry.size
    return sum(held.values())


def _print_set_sizes(listing: FolderListing, pinned: set[str]) -> None:
    """One row per set: the bytes its files and manifest hold, how many of them it shares with
    other names of the folder (hard links), and the folder's total."""
    table = Table(title="sets (bytes on disk)")
    for column in ("group", "tag", "iteration", "files"):
        table.add_column(column)
    table.add_column("bytes", justify="right")
    table.add_column("shared", justify="right")
    table.add_column("pinned")
    names_of_id: dict[str, set[str]] = {}
    for name, entry in listing.entries.items():
        if entry.problem is None:
            names_of_id.setdefault(entry.file_id or name, set()).add(name)
    for s in sets_of(listing):
        names = set(s.manifest.files if s.manifest is not None else s.files)
        if s.manifest is not None:
            names.add(s.manifest.filename)
        names &= set(listing.entries)
        held = _bytes_once(listing, names)
        shared = _bytes_once(
            listing, (n for n in names if names_of_id.get(listing.entries[n].file_id or n, {n}) - names)
        )
        it = s.training_iteration
        table.add_row(
            escape(printable(s.group)),
            escape(printable(s.tag)),
            str(it) if it is not None else "?",
            str(len(names)),
            human_bytes(held),
            human_bytes(shared) if shared else "",
            "yes" if s.tag in pinned else "",
        )
    out = console()
    out.print(table)
    total = _bytes_once(listing, listing.entries)
    out.print(f"folder total: {human_bytes(total)} ({total} bytes on disk; hard links counted once)")


def _tensor_rows(
    obj: Any, path: tuple[Any, ...] = ()
) -> Iterator[tuple[tuple[Any, ...], list[int], str, int]]:
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


def _dotted(parts: tuple[Any, ...]) -> str:
    return ".".join(printable(p, 200) for p in parts)


def _has_tensor(obj: Any) -> bool:
    return next(_tensor_rows(obj), None) is not None


def inspect_command(
    file: Annotated[
        str,
        typer.Argument(help="a checkpoint file (.th, .safetensors) or sharded folder (.dcp), a path or URL"),
    ],
    max_tensors: Annotated[int, typer.Option(help="show at most this many tensors (0: all)")] = 200,
) -> None:
    """Show a checkpoint's metadata and its tensors (name, shape, dtype, bytes).

    Tensor data is never read: `.th` files are memory-mapped, safetensors files are read up to
    their header, and sharded checkpoint folders (`.dcp`) only through their `ksuit.th` and
    `.metadata` (no process group needed). Files are loaded with weights_only=True only; an
    unsafe file is refused.
    """
    with exit_on_errors():
        folder, name = split_file_location(file.rstrip("/"))
        if folder.exists_as() != "folder":
            sizes = {}
        elif is_sharded_filename(name):
            sizes = sharded_folders(folder)
        else:
            sizes = {e.name: e.size for e in folder.entries() if e.problem is None}
        if name not in sizes:
            what = "a sharded checkpoint folder" if is_sharded_filename(name) else "a file"
            raise fail(
                f"{file} is not {what}; pass a checkpoint file such as "
                "<run>/checkpoints/x_cp=latest_model.th (or a sharded folder x_cp=latest_model.dcp)",
                2,
            )
        meta = read_metadata(folder.file_location(name))
    out = console()
    out.print(f"[bold]{escape(printable(file))}[/bold] ({human_bytes(sizes[name])})")
    for key, value in meta.items():
        if not _has_tensor(value):
            out.print(f"  {printable(key)}: {printable(repr(value))}", markup=False)
    rows = list(_tensor_rows(meta))
    table = Table(title=f"{len(rows)} tensors")
    table.add_column("name")
    table.add_column("shape")
    table.add_column("dtype")
    table.add_column("bytes", justify="right")
    shown = rows if max_tensors <= 0 else rows[:max_tensors]
    for parts, shape, dtype, nbytes in shown:
        cells = (_dotted(parts), printable(tuple(shape), 200), printable(dtype, 40))
        table.add_row(*(escape(c) for c in cells), str(nbytes))
    out.print(table)
    if len(shown) < len(rows):
        out.print(f"... {len(rows) - len(shown)} more tensors (--max-tensors 0 shows all)")
    out.print(f"tensor bytes: {human_bytes(sum(r[3] for r in rows))}")


def _recover(folder: Backend, repair: bool, grace: float) -> tuple[RecoveryReport, bool]:
    """Recovery for verify, and whether it refused a journal: a damaged or hostile journal is
    reported as a problem of the run (exit 1), and the sets are still checked."""
    try:
        return (folder.repair(grace) if repair else folder.recover()), False
    except (CorruptCheckpointError, UnsafeCheckpointError) as e:
        return RecoveryReport(problems=[first_line(e)]), True


def _check_loads(s: CheckpointSet) -> None:
    """Adds a problem for every file of the set that does not load (through the safe loader);
    a sharded checkpoint folder is checked without loading its tensors (safe metadata, every
    tensor's chunks cover it exactly, every chunk a well-formed tensor archive)."""
    for name, info in sorted(s.files.items()):
        if name in s.problems:
            continue
        if info.format == SHARDED_FORMAT:
            from ksuit.storage.sharded.verify import check_folder

            problems = check_folder(s.folder.child(name))
            if problems:
                s.problems[name] = "; ".join(problems[:3]) + (
                    f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
                )
            continue
        try:
            with s.folder.open(name) as f:
                load_opened(f, map_location="cpu", mmap=info.format == "torch")
        except (CorruptCheckpointError, UnsafeCheckpointError, OSError) as e:
            s.problems[name] = first_line(e)
        except Exception as e:  # a reader bug must not hide the other sets' verdicts
            s.problems[name] = f"cannot be loaded: {type(e).__name__}: {str(e)[:200]}"


def verify_command(
    run_dir: RunDir,
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="Also remove, on an object store, every leftover of interrupted saves older than --grace: "
            "uncommitted objects and unfinished multipart uploads (recovery alone spares those younger "
            "than an hour, which a save in flight may still be writing).",
        ),
    ] = False,
    grace: Annotated[
        float,
        typer.Option(
            "--grace",
            min=0,
            help="With --repair: spare leftovers younger than this many seconds (0: no save is running; "
            "a save that is, fails cleanly instead of committing).",
        ),
    ] = 0.0,
) -> None:
    """Check every checkpoint set of a run: presence, sizes, checksums and loadability.

    Interrupted saves are first completed or discarded (recovery); a save in flight in a
    training process finishes first, and the next one waits until verify is done. Exit code 1
    when any set is incomplete or any file is corrupt or unsafe, 0 otherwise. Checkpoint folders
    ksuit marked complete (a Hugging Face output folder) are checked against their manifests.
    """
    with exit_on_errors():
        folders = checkpoint_folders(run_dir, checksum=True)
    if folders is not None:
        return print_folders(run_dir, folders, verified=True)
    with exit_on_errors():
        folder = checkpoint_folder(run_dir)
        # a save in flight (another process) finishes first, and none starts while we read
        with folder.lock():
            report, refused = _recover(folder, repair, grace)
            sets = scan_sets(folder, checksum=True)
            for s in sets:
                _check_loads(s)
    out = console()
    if report.rolled_forward or report.removed_temps or report.discarded:
        out.print(
            f"recovery: completed {len(report.rolled_forward)} interrupted renames, "
            f"removed {len(report.removed_temps)} temporary files or uncommitted objects, "
            f"discarded {len(report.discarded)} interrupted saves or uploads"
        )
    if report.kept:
        out.print(
            f"recovery: kept {len(report.kept)} leftovers young enough to belong to a save in flight "
            "(`ksuit verify --repair` removes them when no save is running)",
            markup=False,
        )
    if report.deleted:
        out.print(f"recovery: finished an interrupted set delete ({len(report.deleted)} files removed)")
    for problem in report.problems:  # e.g. a read-only copy: reported, the sets are still checked
        out.print(f"recovery: {printable(problem)}", markup=False, soft_wrap=True)
    table = Table(title=escape(printable(folder.location)))
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
    out.print(table)
    bad = [s for s in sets if not s.ok]
    for s in bad:
        for name, problem in s.problems.items():
            out.print(
                f"{printable(s.group)}@{printable(s.tag)}: {printable(name)}: {printable(problem)}",
                markup=False,
            )
    out.print(f"{len(sets)} sets, {len(bad)} with problems")
    # problems recovery merely reports (a leftover temporary file on a read-only copy) leave the
    # sets valid; a refused journal or a save it could not complete do not
    if bad or refused or report.pending:
        raise typer.Exit(1)
