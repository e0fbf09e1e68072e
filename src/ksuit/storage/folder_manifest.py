"""Folder manifests: what another framework wrote into one folder (a Hugging Face Trainer's
`checkpoint-<n>`), file by file with sizes and xxh3-64 checksums, in `ksuit.manifest.json`.

Protocol: once the framework has written the folder, `write_folder_manifest` lists every file
(subfolders included), makes them durable (`Backend.make_durable`), hashes them and then writes
the manifest, atomically and last. So a folder is *complete* exactly when its manifest is there
and every file matches it: `folder_problems` reports a missing or unreadable manifest, a missing,
resized or changed file, and a file the manifest does not list (written after the folder was
marked complete). A crash at any moment leaves a folder that is either complete or reported.

Reading trusts nothing: the manifest must be a regular file of at most `MAX_MANIFEST_BYTES`,
every field is validated, and every file name is a relative path of at most `MAX_DEPTH + 1`
plain parts joined by '/' (no '.', '..' or empty part, no '\\' or NUL), so a manifest names
only files inside its folder; links and special files are reported, never followed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Annotated, Literal

import pydantic_core
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from ksuit.layout import FOLDER_MANIFEST, is_temp_filename
from ksuit.storage.backend import Backend, Entry, Location, WriteStream
from ksuit.storage.errors import CorruptCheckpointError, UnsafeCheckpointError
from ksuit.storage.manifest import CHECKSUM_ALGORITHM, MAX_MANIFEST_BYTES

FOLDER_MANIFEST_VERSION = 1
MAX_DEPTH = 8  # subfolder levels a folder manifest describes (DeepSpeed's global_step*/ is one)
MAX_FILES = 100_000


@dataclass(frozen=True)
class FolderFile:
    size: int
    checksum: str


@dataclass
class FolderManifest:
    """The files of a folder when it was marked complete; `training_iteration` and `written_by`
    say which checkpoint it is and what marked it."""

    files: dict[str, FolderFile] = field(default_factory=dict)
    training_iteration: dict[str, int] | None = None
    written_by: str | None = None
    version: int = FOLDER_MANIFEST_VERSION
    checksum_algorithm: str = CHECKSUM_ALGORITHM

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def to_json(self) -> str:
        data = {
            "version": self.version,
            "checksum_algorithm": self.checksum_algorithm,
            "training_iteration": self.training_iteration,
            "written_by": self.written_by,
            "files": {
                name: {"size": f.size, "checksum": f.checksum} for name, f in sorted(self.files.items())
            },
        }
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str | bytes, source: str) -> FolderManifest:
        try:
            data = pydantic_core.from_json(text)
        except ValueError as e:
            raise _invalid(source, f"not JSON: {e}") from None
        version = data.get("version") if isinstance(data, dict) else None
        if type(version) is int and version > FOLDER_MANIFEST_VERSION:
            raise CorruptCheckpointError(
                f"{source} has folder manifest version {version}; this ksuit reads up to "
                f"{FOLDER_MANIFEST_VERSION}: upgrade ksuit"
            )
        try:
            schema = _Schema.model_validate(data)
        except ValidationError as e:
            errors = e.errors(include_url=False, include_input=False)[:3]
            where = "; ".join(f"{'.'.join(str(p) for p in err['loc'])[:200]}: {err['msg']}" for err in errors)
            raise _invalid(source, where or "not a JSON object") from None
        files = {name: FolderFile(f.size, f.checksum) for name, f in schema.files.items()}
        iteration = (
            None
            if schema.training_iteration is None
            else {str(k): v for k, v in schema.training_iteration.items()}
        )
        return cls(files, iteration, schema.written_by, schema.version, schema.checksum_algorithm)


def check_relative_name(name: str) -> str:
    """A file of the folder: plain parts joined by '/', at most `MAX_DEPTH` folders deep."""
    parts = name.split("/") if isinstance(name, str) else []
    if (
        not parts
        or len(parts) > MAX_DEPTH + 1
        or any(p in ("", ".", "..") or "\\" in p or "\0" in p or len(p.encode()) > 255 for p in parts)
    ):
        raise ValueError(f"{str(name)[:200]!r} is not a relative file name inside this folder")
    return name


_STRICT = ConfigDict(strict=True, extra="ignore")
_Count = Annotated[int, Field(ge=0)]


class _FileSchema(BaseModel):
    model_config = _STRICT
    size: _Count
    checksum: Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]


class _Schema(BaseModel):
    model_config = _STRICT
    files: Annotated[
        dict[Annotated[str, AfterValidator(check_relative_name)], _FileSchema], Field(max_length=MAX_FILES)
    ]
    training_iteration: dict[Literal["epoch", "update", "sample"], _Count] | None = None
    written_by: Annotated[str, Field(max_length=200)] | None = None
    version: Annotated[int, Field(ge=1, le=FOLDER_MANIFEST_VERSION)] = FOLDER_MANIFEST_VERSION
    checksum_algorithm: Literal["xxh3_64"] = "xxh3_64"


def _invalid(source: str, problem: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{source} is not a valid ksuit folder manifest ({problem}); the checkpoint it marks cannot be "
        "verified: treat it as incomplete, or delete the manifest and mark the folder again"
    )


def _open(folder: Backend | Location) -> Backend:
    from ksuit.storage.locations import open_backend  # the local backend imports this package

    return open_backend(folder)


def _subfolder(folder: Backend, path: str) -> Backend:
    """The backend of the subfolder `path` ('a/b'; '' is the folder itself)."""
    for part in path.split("/") if path else []:
        folder = folder.child(part)
    return folder


def _owner(folder: Backend, name: str) -> tuple[Backend, str]:
    """The backend of the subfolder holding the relative file `name`, and its own name there."""
    parent, _, own = name.rpartition("/")
    return _subfolder(folder, parent), own


def folder_files(folder: Backend | Location) -> dict[str, Entry]:
    """`{relative name: entry}` of every file in the folder and its subfolders, except the
    folder manifest and ksuit's temporary files. Links and special files are entries with a
    `problem`; subfolders deeper than `MAX_DEPTH` are an error."""
    result: dict[str, Entry] = {}

    def walk(backend: Backend, prefix: str, depth: int) -> None:
        for entry in backend.entries():
            if is_temp_filename(entry.name) or (depth == 0 and entry.name == FOLDER_MANIFEST):
                continue
            result[prefix + entry.name] = entry
            if len(result) > MAX_FILES:
                raise ValueError(f"{_open(folder).location} holds more than {MAX_FILES} files")
        for sub in backend.folders():
            if depth >= MAX_DEPTH:
                raise ValueError(
                    f"{backend.file_location(sub)} is more than {MAX_DEPTH} folders deep; ksuit's folder "
                    "manifests describe checkpoints with fewer levels"
                )
            walk(backend.child(sub), f"{prefix}{sub}/", depth + 1)

    walk(_open(folder), "", 0)
    return result


def write_folder_manifest(
    folder: Backend | Location,
    training_iteration: dict[str, int] | None = None,
    written_by: str | None = None,
) -> FolderManifest:
    """Marks a folder complete: makes its files durable, hashes them, then writes its
    manifest atomically, last. Refuses (before writing anything) a folder holding a link or a
    special file, which a manifest could not vouch for."""
    backend = _open(folder)
    files = folder_files(backend)
    irregular = {name: e.problem for name, e in files.items() if e.problem is not None}
    if irregular:
        name, problem = next(iter(sorted(irregular.items())))
        raise UnsafeCheckpointError(
            f"cannot mark {backend.location} complete: {name} {problem}"
            + (f" (and {len(irregular) - 1} more)" if len(irregular) > 1 else "")
        )
    # every file, then every folder (deepest first, so each subfolder's entry is durable in its
    # parent), before the manifest that says they are complete
    by_folder: dict[str, list[str]] = {"": []}
    for name in files:
        parent, _, own = name.rpartition("/")
        by_folder.setdefault(parent, []).append(own)
        while parent:
            parent = parent.rpartition("/")[0]
            by_folder.setdefault(parent, [])
    for parent in sorted(by_folder, key=lambda p: (-p.count("/"), -len(p), p)):
        _subfolder(backend, parent).make_durable(by_folder[parent])
    manifest = FolderManifest(training_iteration=training_iteration, written_by=written_by)
    for name in sorted(files):
        sub, own = _owner(backend, name)
        hashed = sub.checksum(own)
        if hashed is None:
            raise FileNotFoundError(
                f"{backend.file_location(name)} vanished while its folder was marked complete"
            )
        manifest.files[name] = FolderFile(*hashed)
    data = manifest.to_json().encode()

    def write(out: WriteStream) -> None:
        out.write(data)

    backend.write_file(FOLDER_MANIFEST, write, len(data))
    return manifest


def read_folder_manifest(folder: Backend | Location) -> FolderManifest:
    """The validated manifest of a folder; `FileNotFoundError` when it has none,
    `CorruptCheckpointError` naming it when it is damaged or not a regular file."""
    backend = _open(folder)
    try:
        data = backend.read_small(FOLDER_MANIFEST, MAX_MANIFEST_BYTES, "folder manifest")
    except UnsafeCheckpointError as e:
        raise CorruptCheckpointError(str(e)) from None
    return FolderManifest.from_json(data, source=backend.file_location(FOLDER_MANIFEST))


def folder_problems(folder: Backend | Location, checksum: bool = True) -> dict[str, str]:
    """`{file: problem}` of a folder against its manifest; empty when the folder is complete.

    `checksum=False` compares sizes only (no file is read)."""
    backend = _open(folder)
    try:
        manifest = read_folder_manifest(backend)
    except FileNotFoundError:
        return {FOLDER_MANIFEST: "missing: the folder was never marked complete (a crash during its save?)"}
    except (CorruptCheckpointError, OSError) as e:
        return {FOLDER_MANIFEST: str(e).splitlines()[0] if str(e) else type(e).__name__}
    try:
        present = folder_files(backend)
    except (ValueError, OSError) as e:
        return {"(folder)": str(e)}
    problems: dict[str, str] = {}
    for name, listed in manifest.files.items():
        entry = present.get(name)
        if entry is None:
            problems[name] = "missing"
        elif entry.problem is not None:
            problems[name] = entry.problem
        elif entry.size != listed.size:
            problems[name] = f"size {entry.size} != {listed.size} in manifest"
        elif checksum:
            sub, own = _owner(backend, name)
            hashed = sub.checksum(own)
            if hashed is None:
                problems[name] = "missing or no longer a regular file"
            elif hashed != (listed.size, listed.checksum):
                problems[name] = f"checksum {hashed[1]} != {listed.checksum} in manifest"
    for name, entry in present.items():
        if name not in manifest.files:
            problems[name] = (
                entry.problem or "not listed in the manifest (written after the folder was marked complete)"
            )
    return problems
