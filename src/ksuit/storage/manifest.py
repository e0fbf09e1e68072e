"""Per-set manifests: which files make up the set `<group>_cp=<tag>`, with sizes, checksums
and the training iteration each was written at."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ksuit.layout import manifest_filename, parse_manifest_filename
from ksuit.storage.atomic import CHECKSUM_ALGORITHM, hash_file
from ksuit.storage.errors import CorruptCheckpointError

MANIFEST_VERSION = 1


@dataclass
class ManifestEntry:
    size: int
    checksum: str
    kind: str | None = None
    training_iteration: dict[str, int] | None = None


@dataclass
class Manifest:
    group: str
    tag: str
    files: dict[str, ManifestEntry] = field(default_factory=dict)
    training_iteration: dict[str, int] | None = None
    run_id: str | None = None
    commit_sequence: int | None = None  # the journal sequence of the save that wrote it
    version: int = MANIFEST_VERSION
    checksum_algorithm: str = CHECKSUM_ALGORITHM

    @property
    def filename(self) -> str:
        return manifest_filename(self.group, self.tag)

    def to_json(self) -> str:
        data = asdict(self)
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "manifest") -> Manifest:
        try:
            data = json.loads(text)
            files = {name: ManifestEntry(**entry) for name, entry in data.pop("files").items()}
            manifest = cls(files=files, **data)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise CorruptCheckpointError(f"{source} is not a valid ksuit manifest: {e}") from e
        if manifest.version > MANIFEST_VERSION:
            raise CorruptCheckpointError(
                f"{source} has manifest version {manifest.version}; this ksuit reads up to "
                f"{MANIFEST_VERSION}: upgrade ksuit"
            )
        return manifest

    def iterations(self) -> set[str]:
        """Distinct training iterations of the files (one element for a consistent set)."""
        return {json.dumps(e.training_iteration, sort_keys=True) for e in self.files.values()}


def read_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    return Manifest.from_json(path.read_text(), source=str(path))


def list_manifests(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if parse_manifest_filename(p.name) is not None)


def verify_file(folder: str | Path, name: str, entry: ManifestEntry, checksum: bool = True) -> str | None:
    """None if the file matches its entry; otherwise what is wrong with it."""
    path = Path(folder) / name
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    if size != entry.size:
        return f"size {size} != {entry.size} in manifest"
    if checksum:
        _, digest = hash_file(path)
        if digest != entry.checksum:
            return f"checksum {digest} != {entry.checksum} in manifest"
    return None


def manifest_problems(folder: str | Path, manifest: Manifest, checksum: bool = True) -> dict[str, str]:
    """`{file name: problem}` for every file of the set that does not match."""
    problems = {}
    for name, entry in manifest.files.items():
        problem = verify_file(folder, name, entry, checksum=checksum)
        if problem is not None:
            problems[name] = problem
    return problems


def entry_from_dict(data: dict[str, Any]) -> ManifestEntry:
    return ManifestEntry(**data)
