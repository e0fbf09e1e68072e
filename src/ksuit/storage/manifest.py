"""Per-set manifests: which files make up the set `<group>_cp=<tag>`, with sizes, checksums
and the training iteration each was written at.

On disk a manifest is the JSON `Manifest.to_json` writes (unchanged since ksuit 0.1). Reading
one trusts nothing: the file must be a regular file (not a link, FIFO or device) of at most
`MAX_MANIFEST_BYTES`, and every field is validated with strict types (`_ManifestSchema`): sizes
are ints >= 0, checksums xxh3-64 hex digests, iterations `{epoch|update|sample: int >= 0}`,
and every file name a plain checkpoint file name of the layout grammar or a foreign checkpoint
ksuit writes (`*.ckpt`; no '/', no '..', not absolute, not hidden), so a manifest can only ever
name checkpoint files inside its own folder, and the optional `metrics` (the values logged when
the set was saved, which retention's `keep_best` reads) at most `MAX_METRICS` names of at most
`MAX_METRIC_NAME` characters, each with a finite float. Manifests without `metrics` (every ksuit
before it) read as before. Any
violation is a `CorruptCheckpointError` naming the manifest: the set is damaged, not the run.
Unknown extra keys are ignored, so a newer ksuit may add fields without breaking this one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Annotated, Literal

import pydantic_core
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from ksuit.layout import (
    ROLES,
    is_foreign_filename,
    is_part_filename,
    is_sharded_filename,
    manifest_filename,
    parse_checkpoint_filename,
)
from ksuit.storage.backend import Backend, Entry, Location, folder_digest
from ksuit.storage.errors import CorruptCheckpointError, UnsafeCheckpointError

CHECKSUM_ALGORITHM = "xxh3_64"
MANIFEST_VERSION = 1
MAX_MANIFEST_BYTES = 16 << 20  # ~100k files per set
MAX_METRICS = 256
MAX_METRIC_NAME = 200


@dataclass
class ManifestEntry:
    """One file of a set. `role` (model, optim, trainer) is stored under the JSON key `kind`, as
    ksuit 0.1 wrote it. A sharded checkpoint folder (`..._model.dcp`) also lists its `parts`
    (`{part name: (size, checksum)}`, every rank's files); its own size and checksum are then
    `folder_digest(parts)`."""

    size: int
    checksum: str
    role: str | None = None
    training_iteration: dict[str, int] | None = None
    parts: dict[str, tuple[int, str]] | None = None

    def to_dict(self) -> dict[str, object]:
        data: dict[str, object] = {
            "size": self.size,
            "checksum": self.checksum,
            "kind": self.role,
            "training_iteration": self.training_iteration,
        }
        if self.parts is not None:
            data["parts"] = {name: {"size": size, "checksum": c} for name, (size, c) in self.parts.items()}
        return data


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
    metrics: dict[str, float] | None = None  # values logged when the set was saved

    @property
    def filename(self) -> str:
        return manifest_filename(self.group, self.tag)

    def to_json(self) -> str:
        data = asdict(replace(self, files={}))  # the entries below, without copying them twice
        data["files"] = {name: entry.to_dict() for name, entry in self.files.items()}
        if self.metrics is None:  # as every ksuit before metrics wrote it
            del data["metrics"]
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "manifest") -> Manifest:
        """Parses and validates a manifest (see the module docstring)."""
        try:
            data = pydantic_core.from_json(text)  # bounded nesting; bad UTF-8 is an error
        except ValueError as e:
            raise _invalid(source, f"not JSON: {e}") from None
        version = data.get("version", MANIFEST_VERSION) if isinstance(data, dict) else None
        if type(version) is int and version > MANIFEST_VERSION:
            raise CorruptCheckpointError(
                f"{source} has manifest version {version}; this ksuit reads up to "
                f"{MANIFEST_VERSION}: upgrade ksuit"
            )
        try:
            schema = _ManifestSchema.model_validate(data)
        except ValidationError as e:
            raise _invalid(source, _first_errors(e)) from None
        files = {
            name: ManifestEntry(
                e.size,
                e.checksum,
                e.kind,
                None
                if e.training_iteration is None
                else {str(k): v for k, v in e.training_iteration.items()},
                None if e.parts is None else {n: (p.size, p.checksum) for n, p in e.parts.items()},
            )
            for name, e in schema.files.items()
        }
        return cls(files=files, **schema.model_dump(exclude={"files"}))

    def iterations(self) -> set[str]:
        """Distinct training iterations of the files (one element for a consistent set)."""
        return {json.dumps(e.training_iteration, sort_keys=True) for e in self.files.values()}


def _iteration(value: Mapping[str, int] | None) -> dict[str, int] | None:
    return None if value is None else {str(k): int(v) for k, v in value.items()}


def check_entry_name(name: str) -> str:
    """A manifest's file name: a plain checkpoint file name of this folder (of the layout
    grammar, or a foreign checkpoint ksuit writes, e.g. Lightning's `last.ckpt`), nothing else."""
    if (
        not name
        or any(c in name for c in "/\\\0")
        or ".." in name
        or name.startswith(".")
        or (parse_checkpoint_filename(name) is None and not is_foreign_filename(name))
    ):
        raise ValueError(f"{name[:200]!r} is not a checkpoint file name of this folder")
    return name


_STRICT = ConfigDict(strict=True, extra="ignore")
_Count = Annotated[int, Field(ge=0)]
_Iteration = dict[Literal["epoch", "update", "sample"], _Count]
_Text = Annotated[str, Field(min_length=1, max_length=1000)]
_MetricName = Annotated[str, Field(min_length=1, max_length=MAX_METRIC_NAME)]
_Finite = Annotated[float, Field(allow_inf_nan=False)]


def check_part_name(name: str) -> str:
    """A part of a sharded checkpoint folder: a plain name inside that folder, nothing else."""
    if not is_part_filename(name):
        raise ValueError(f"{name[:200]!r} is not a part name of a sharded checkpoint folder")
    return name


_Checksum = Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]


class _PartSchema(BaseModel):
    model_config = _STRICT
    size: _Count
    checksum: _Checksum


class _EntrySchema(BaseModel):
    model_config = _STRICT
    size: _Count
    checksum: _Checksum
    kind: Literal[ROLES] | None = None  # type: ignore[valid-type]  # the JSON key of `role`
    training_iteration: _Iteration | None = None
    parts: dict[Annotated[str, AfterValidator(check_part_name)], _PartSchema] | None = None


class _ManifestSchema(BaseModel):
    model_config = _STRICT
    group: _Text
    tag: _Text
    files: dict[Annotated[str, AfterValidator(check_entry_name)], _EntrySchema]
    training_iteration: _Iteration | None = None
    run_id: str | None = None
    commit_sequence: Annotated[int, Field(ge=0)] | None = None
    version: Annotated[int, Field(ge=1, le=MANIFEST_VERSION)] = MANIFEST_VERSION
    checksum_algorithm: Literal["xxh3_64"] = "xxh3_64"
    metrics: Annotated[dict[_MetricName, _Finite], Field(max_length=MAX_METRICS)] | None = None


def _first_errors(e: ValidationError, n: int = 3) -> str:
    """`files.x.size: Input should be ...` for the first errors (never the input values)."""
    errors = e.errors(include_url=False, include_input=False)
    parts = [
        f"{'.'.join(str(p) for p in err['loc'])[:200]}: {err['msg']}" if err["loc"] else "not a JSON object"
        for err in errors[:n]
    ]
    more = f" (and {len(errors) - n} more)" if len(errors) > n else ""
    return "; ".join(parts) + more


def _invalid(source: str, problem: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{source} is not a valid ksuit manifest ({problem}); the set it describes cannot be "
        "verified: resume skips it, delete it or restore it from a backup"
    )


def read_manifest(folder: Backend | Location, name: str | None = None) -> Manifest:
    """Reads and validates the manifest `name` of a folder (or, without `name`, the manifest at
    the location `folder`); it must be a regular file (links are not followed).

    Raises `CorruptCheckpointError` naming the file, or `FileNotFoundError`.
    """
    from ksuit.storage.locations import open_backend, split_file_location  # local backends use this module

    if name is None:
        if isinstance(folder, Backend):
            raise TypeError("read_manifest(backend) needs the manifest's name")
        backend, name = split_file_location(folder)
    else:
        backend = open_backend(folder)
    try:
        data = backend.read_small(name, MAX_MANIFEST_BYTES, "manifest")
    except UnsafeCheckpointError as e:
        raise CorruptCheckpointError(str(e)) from None
    return Manifest.from_json(data, source=backend.file_location(name))


def verify_file(
    folder: Backend | Location,
    name: str,
    entry: ManifestEntry,
    checksum: bool = True,
    entries: Mapping[str, Entry] | None = None,
) -> str | None:
    """None if the file matches its manifest entry; otherwise what is wrong with it.

    Only a regular file of the folder is looked at: a name that is not a plain file name, a
    symbolic link (wherever it points), a FIFO or a device is a problem, never opened.
    `entries` (the folder's listing, when the caller has it) saves a look at the folder.
    """
    try:
        check_entry_name(name)
    except ValueError as e:
        return str(e)
    from ksuit.storage.locations import open_backend  # local backends use this module

    backend = open_backend(folder)
    if entries is None:
        entries = {e.name: e for e in backend.entries()}
    found = entries.get(name)
    if is_sharded_filename(name):
        return _verify_folder(backend, name, entry, checksum, found)
    if found is None:
        return "missing"
    if found.problem is not None:
        return found.problem
    if found.size != entry.size:
        return f"size {found.size} != {entry.size} in manifest"
    if checksum:
        hashed = backend.checksum(name)
        if hashed is None:
            return "missing or no longer a regular file"
        return hash_problem(*hashed, entry)
    return None


def hash_problem(size: int, digest: str, entry: ManifestEntry) -> str | None:
    """What is wrong with a file of `size` bytes hashing to `digest` that `entry` describes
    (None: it matches). The one wording of a mismatch: `ksuit verify`, resume and loading use it."""
    if size != entry.size:
        return f"size {size} != {entry.size} in manifest"
    if digest != entry.checksum:
        return f"checksum {digest} != {entry.checksum} in manifest"
    return None


def _verify_folder(
    backend: Backend, name: str, entry: ManifestEntry, checksum: bool, found: Entry | None
) -> str | None:
    """`verify_file` of a sharded checkpoint folder: a real folder holding exactly the parts the
    manifest lists, each with its size (and checksum), and parts that add up to the entry."""
    if found is not None:  # a listed entry is never a folder: a link, file, FIFO or device
        return found.problem or "is a file, not a sharded checkpoint folder"
    if entry.parts is None:
        return "the manifest lists no parts for this sharded checkpoint folder"
    if folder_digest(entry.parts) != (entry.size, entry.checksum):
        return "its parts in the manifest do not add up to its recorded size and checksum"
    if name not in backend.folders():
        return "missing"
    child = backend.child(name)
    inside = {e.name: e for e in child.entries()}
    problems = []
    for sub in child.folders():
        problems.append(f"{sub}: a folder inside a sharded checkpoint")
    for part in sorted(set(inside) - set(entry.parts)):
        problems.append(f"{part}: not listed in the manifest")
    for part, (size, digest) in sorted(entry.parts.items()):
        e = inside.get(part)
        if e is None:
            problems.append(f"{part}: missing")
        elif e.problem is not None:
            problems.append(f"{part}: {e.problem}")
        elif e.size != size:
            problems.append(f"{part}: size {e.size} != {size} in manifest")
        elif checksum:
            hashed = child.checksum(part)
            if hashed is None:
                problems.append(f"{part}: missing or no longer a regular file")
            elif hashed[1] != digest:
                problems.append(f"{part}: checksum {hashed[1]} != {digest} in manifest")
    return "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "") or None
