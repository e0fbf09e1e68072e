"""Checkpoint folders another framework wrote and ksuit marked complete with a folder manifest
(`ksuit.storage.folder_manifest`), such as a Hugging Face Trainer's `checkpoint-<n>`.

A location holds them in one of two ways: it is such a folder itself (it has a folder
manifest), or it is an output folder whose numbered subfolders `<prefix>-<n>` are (at least one
of them with a manifest; its numbered siblings of the same prefix without one are incomplete).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ksuit.layout import FOLDER_MANIFEST
from ksuit.storage import Backend, Location, open_backend
from ksuit.storage.errors import CorruptCheckpointError
from ksuit.storage.folder_manifest import FolderManifest, folder_files, folder_problems, read_folder_manifest
from ksuit.utils.training import TrainingIteration

NUMBERED_FOLDER = re.compile(r"^(?P<prefix>.+)-(?P<number>[0-9]{1,18})$")


@dataclass
class CheckpointFolder:
    """One checkpoint folder: its manifest (None when missing or unreadable) and its problems
    (empty when complete)."""

    folder: Backend
    name: str
    manifest: FolderManifest | None
    problems: dict[str, str] = field(default_factory=dict)
    size_bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def ref(self) -> Path | str:
        return self.folder.ref

    @property
    def number(self) -> int | None:
        match = NUMBERED_FOLDER.match(self.name)
        return int(match["number"]) if match else None

    @property
    def training_iteration(self) -> TrainingIteration | None:
        if self.manifest is not None and self.manifest.training_iteration:
            return TrainingIteration.from_dict(self.manifest.training_iteration)
        return None


def _has_manifest(folder: Backend) -> bool:
    try:
        return any(e.name == FOLDER_MANIFEST for e in folder.entries())
    except OSError:
        return False


def _name_of(folder: Backend) -> str:
    return folder.location.rstrip("/").rsplit("/", 1)[-1]


def checkpoint_folders(location: Location | Backend, checksum: bool = False) -> list[CheckpointFolder] | None:
    """The checkpoint folders at `location` (see the module docstring), each checked against
    its manifest (sizes; with `checksum`, every byte), numbered ones in ascending order; None
    when `location` holds none (it may be a ksuit run folder instead)."""
    backend = open_backend(location)
    if backend.exists_as() != "folder":
        return None
    if _has_manifest(backend):
        return [check_folder(backend, _name_of(backend), checksum)]
    subfolders = backend.folders()
    marked = {name for name in subfolders if _has_manifest(backend.child(name))}
    prefixes = {m["prefix"] for name in marked if (m := NUMBERED_FOLDER.match(name))}
    chosen = marked | {
        name for name in subfolders if (m := NUMBERED_FOLDER.match(name)) and m["prefix"] in prefixes
    }
    if not chosen:
        return None

    def order(name: str) -> tuple[str, int, str]:
        match = NUMBERED_FOLDER.match(name)
        return (match["prefix"], int(match["number"]), name) if match else (name, -1, name)

    return [check_folder(backend.child(name), name, checksum) for name in sorted(chosen, key=order)]


def check_folder(folder: Backend, name: str, checksum: bool = True) -> CheckpointFolder:
    """One checkpoint folder checked against its manifest."""
    problems = folder_problems(folder, checksum=checksum)
    try:
        manifest: FolderManifest | None = read_folder_manifest(folder)
    except (FileNotFoundError, CorruptCheckpointError, OSError):
        manifest = None
    if manifest is not None:
        size = manifest.size_bytes
    else:
        try:
            size = sum(e.size for e in folder_files(folder).values() if e.problem is None)
        except (ValueError, OSError):
            size = 0
    return CheckpointFolder(folder, name, manifest, problems, size)
