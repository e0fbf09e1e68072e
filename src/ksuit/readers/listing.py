"""Listing the checkpoints of a run from file names (and manifests), without loading tensors.

Only regular files are checkpoints: an entry with a checkpoint or manifest name that is a
symbolic link (wherever it points, inside the folder or out), a FIFO, a device or a folder is
never followed, opened or stat'ed through; `folder_problems` reports it instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ksuit.layout import CheckpointName, parse_checkpoint_filename, parse_manifest_filename
from ksuit.storage.errors import CorruptCheckpointError, UnsafeCheckpointError
from ksuit.storage.manifest import Manifest, read_manifest
from ksuit.storage.safe_files import not_regular_problem
from ksuit.utils.training import TrainingIteration


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint file of a run."""

    model_name: str
    tag: str
    kind: str
    path: Path
    size_bytes: int
    training_iteration: TrainingIteration | None
    info: str = ""
    format: str = "torch"

    @property
    def group(self) -> str:
        return f"{self.model_name}_{self.info}" if self.info else self.model_name


def find_checkpoint_dir(run_dir: str | Path) -> Path:
    """The checkpoint folder of a run: `run_dir/checkpoints`, or `run_dir` itself if it holds
    checkpoints, or the single `run_dir/<stage>/checkpoints`."""
    if not isinstance(run_dir, (str, Path)) or str(run_dir) == "":
        raise TypeError(f"run_dir must be a path to a run folder (<output_root>/<run_id>), got {run_dir!r}")
    run_dir = Path(run_dir)
    try:
        folder = _find_checkpoint_dir(run_dir)
        with os.scandir(folder) as entries:  # fails here, with the fix below, when unreadable
            next(entries, None)
        return folder
    except PermissionError as e:
        raise PermissionError(
            e.errno,
            f"cannot read the run folder {run_dir} ({e.filename or run_dir}: permission denied); "
            "run as a user that may read it or fix its permissions (chmod/chown)",
            e.filename,
        ) from e


def _find_checkpoint_dir(run_dir: Path) -> Path:
    if not run_dir.exists():
        raise FileNotFoundError(f"run folder {run_dir} does not exist; pass <output_root>/<run_id>")
    if not run_dir.is_dir():
        raise NotADirectoryError(f"{run_dir} is a file; pass the run folder (<output_root>/<run_id>)")
    if (run_dir / "checkpoints").is_dir():
        return run_dir / "checkpoints"
    if run_dir.name == "checkpoints" or any(parse_checkpoint_filename(p.name) for p in run_dir.iterdir()):
        return run_dir
    stages = sorted(p / "checkpoints" for p in run_dir.iterdir() if (p / "checkpoints").is_dir())
    if len(stages) == 1:
        return stages[0]
    if len(stages) > 1:
        names = ", ".join(str(s.parent.name) for s in stages)
        raise ValueError(f"{run_dir} has several stages ({names}); pass <run_dir>/<stage>")
    raise FileNotFoundError(f"{run_dir} has no checkpoints folder; is it a ksuit run folder?")


def manifest_index(folder: Path) -> tuple[dict[str, Manifest], dict[str, str]]:
    """`({manifest file: manifest}, {checkpoint file: manifest file listing it})` of a folder.

    Unreadable manifests are left out here; `folder_problems` and `ksuit.readers.sets` report them.
    """
    manifests, _ = read_manifests(folder)
    owner: dict[str, str] = {}
    for name, manifest in manifests.items():
        for filename in manifest.files:
            owner[filename] = name
    return manifests, owner


def read_manifests(folder: Path) -> tuple[dict[str, Manifest], dict[str, str]]:
    """`({manifest file: manifest}, {manifest file: why it cannot be read})` of a folder."""
    manifests: dict[str, Manifest] = {}
    problems: dict[str, str] = {}
    for path in sorted(folder.iterdir()):
        if parse_manifest_filename(path.name) is None:
            continue
        try:
            manifests[path.name] = read_manifest(path)
        except (CorruptCheckpointError, UnsafeCheckpointError, OSError) as e:
            problems[path.name] = str(e).splitlines()[0] if str(e) else type(e).__name__
    return manifests, problems


def folder_problems(run_dir: str | Path) -> dict[str, str]:
    """`{file name: problem}` for the checkpoint folder of a run: manifests that cannot be read
    and checkpoint or manifest names that are not regular files."""
    folder = find_checkpoint_dir(run_dir)
    _, irregular = _scandir(folder)
    _, problems = read_manifests(folder)
    return {**problems, **irregular}


def _iteration_of(
    name: CheckpointName, manifests: dict[str, Manifest], owner: dict[str, str]
) -> TrainingIteration | None:
    it = name.training_iteration
    if it is not None:
        return it
    manifest = manifests.get(owner.get(name.filename, ""))
    entry = manifest.files.get(name.filename) if manifest is not None else None
    if entry is None or not entry.training_iteration:
        return None
    return TrainingIteration.from_dict(entry.training_iteration)


def list_checkpoints(run_dir: str | Path) -> list[CheckpointInfo]:
    """Every checkpoint file of a run, sorted by model, iteration and tag.

    The iteration comes from the tag (`E10_U200_S800`) or, for `latest`, `last` and `best_...`,
    from the set's manifest; no tensor is loaded.
    """
    folder = find_checkpoint_dir(run_dir)
    manifests, owner = manifest_index(folder)
    result = []
    for entry in _scandir(folder)[0]:
        name = parse_checkpoint_filename(entry.name)
        if name is None:
            continue
        result.append(
            CheckpointInfo(
                model_name=name.name,
                tag=name.tag,
                kind=name.kind,
                path=Path(entry.path),
                size_bytes=entry.stat(follow_symlinks=False).st_size,
                training_iteration=_iteration_of(name, manifests, owner),
                info=name.info,
                format=name.format,
            )
        )

    def order(c: CheckpointInfo) -> tuple:
        it = c.training_iteration
        return (
            c.model_name,
            c.info,
            it is None,
            (it.epoch, it.update, it.sample) if it and it.is_fully_specified else (0, 0, 0),
            c.tag,
            c.kind,
        )

    return sorted(result, key=order)


def _scandir(folder: Path) -> tuple[list[os.DirEntry], dict[str, str]]:
    """`(regular files, {name: problem} for checkpoint or manifest names that are not regular files)`;
    links are never followed."""
    regular, irregular = [], {}
    with os.scandir(folder) as it:
        for entry in it:
            if entry.is_file(follow_symlinks=False):
                regular.append(entry)
            elif parse_checkpoint_filename(entry.name) or parse_manifest_filename(entry.name):
                try:
                    irregular[entry.name] = not_regular_problem(entry.stat(follow_symlinks=False).st_mode)
                except FileNotFoundError:  # removed meanwhile
                    continue
    return regular, irregular


def irregular_entries(run_dir: str | Path) -> dict[str, str]:
    """`{name: problem}` for checkpoint or manifest names in the folder that are not regular files."""
    return _scandir(find_checkpoint_dir(run_dir))[1]
