"""Listing the checkpoints of a run from file names (and manifests), without loading tensors."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ksuit.layout import CheckpointName, parse_checkpoint_filename, parse_manifest_filename
from ksuit.storage.errors import CorruptCheckpointError
from ksuit.storage.manifest import Manifest, read_manifest
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

    Unreadable manifests are left out here; `ksuit.readers.sets` reports them.
    """
    manifests: dict[str, Manifest] = {}
    owner: dict[str, str] = {}
    for path in sorted(folder.iterdir()):
        if parse_manifest_filename(path.name) is None:
            continue
        try:
            manifest = read_manifest(path)
        except (CorruptCheckpointError, OSError):
            continue
        manifests[path.name] = manifest
        for filename in manifest.files:
            owner[filename] = path.name
    return manifests, owner


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
    for entry in _scandir(folder):
        name = parse_checkpoint_filename(entry.name)
        if name is None:
            continue
        result.append(
            CheckpointInfo(
                model_name=name.name,
                tag=name.tag,
                kind=name.kind,
                path=Path(entry.path),
                size_bytes=entry.stat().st_size,
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


def _scandir(folder: Path):
    with os.scandir(folder) as it:
        return [e for e in it if e.is_file()]
