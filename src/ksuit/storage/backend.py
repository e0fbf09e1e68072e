"""The storage backend interface: how checkpoint bytes reach a medium and come back.

A `Backend` is one folder on one medium (a local directory, a prefix in an object store). Every
layer above `ksuit.storage` reads and writes checkpoint files through it and never touches a
path with `os` or `open`, so a checkpoint location may be a URL. What a backend does:

- **write a set** (`begin_set`): stage files through a hashing `WriteStream` (checksum and size
  computed from the bytes as they go out), make each staged file durable, then `commit` the
  set with its manifests in one atomic step; `abort` leaves the previous sets untouched;
- **write one file** atomically (`write_file`), for files that belong to no set (exports);
- **write a folder from several processes** (sharded checkpoints, `ksuit.storage.sharded`): the
  process that holds the set reserves a staged folder (`SetTransaction.stage_folder`), every
  process writes its own part files into it (`Backend.write_part`, hashed and durable), and the
  coordinator adds the folder to the set with every part's size and checksum
  (`SetTransaction.add_folder`); the commit then switches the folder like any file. Optional:
  a backend without it raises `NotImplementedError` and sharded saves say so;
- **list** the folder (`entries`, `folders`), **read** small files (`read_small`), **open**
  a file for loading with range reads (`open`), **checksum** a file (`checksum`);
- **delete** files (`delete`) or a whole committed set crash-safely (`delete_set`), make
  files others wrote **durable** (`make_durable`, optional), **lock** the folder against
  concurrent switches (`lock`), **recover** from an interrupted save or delete (`recover`), and
  say how much room is left (`free_bytes`).

How each medium keeps the crash-safety promise is the backend's own protocol, stated in its
module docstring: `ksuit.storage.local` (stage, journal, rename) for local file systems,
`ksuit.storage.objectstore` (staged objects, a create-only commit record, a head swapped by
compare-and-swap) for S3 and other fsspec file systems. Backends are chosen from the location
(`ksuit.storage.locations.open_backend`): a plain path or `file://` URL is local, `s3://`,
`memory://` and other fsspec URLs are object stores.

Names passed to a backend are plain file names inside its folder (no separators); a backend
refuses anything else.
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal, Protocol

from typing_extensions import Buffer


class WriteStream(Protocol):
    """A write-only binary stream: what formats write into (`torch.save` takes one too)."""

    def write(self, data: Buffer, /) -> int: ...

    def tell(self) -> int: ...

    def flush(self) -> None: ...

    def writable(self) -> bool: ...


WriteFn = Callable[[WriteStream], None]
Location = str | os.PathLike[str]
"""A path or URL (`ksuit.storage.locations.open_backend` picks the backend)."""


@dataclass(frozen=True)
class Entry:
    """One entry of a folder with a checkpoint-like name: a regular file of `size` bytes, or,
    when `problem` is set, something that is not a regular file (a link, FIFO, device, folder)
    and is never opened."""

    name: str
    size: int
    problem: str | None = None
    file_id: str | None = None
    """What identifies the file's bytes on the medium (device and inode on a local disk): names
    with one id are hard links of one file and take its bytes once. None where the medium does
    not say (every name then counts on its own)."""


@dataclass(frozen=True)
class WrittenFile:
    """A file a backend wrote: where it is, its size and checksum (of the bytes written).
    `shared_with`: the file of the same save whose bytes it shares (a hard link), if any."""

    location: str
    name: str
    size: int
    checksum: str
    seconds: float = 0.0
    shared_with: str | None = None


@dataclass
class RecoveryReport:
    """What recovery did in a folder, and what it could not do (with the fix)."""

    rolled_forward: list[str] = field(default_factory=list)  # final names put in place
    removed_temps: list[str] = field(default_factory=list)
    discarded: list[str] = field(default_factory=list)  # "<journal>: <why>"
    deleted: list[str] = field(default_factory=list)  # files of interrupted set deletes removed
    pending: list[PendingSwitch] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # leftovers too young to remove: a save in flight may still be writing them (object stores)
    kept: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PendingSwitch:
    """A committed save recovery could not complete; `finals` are the files it would write."""

    name: str
    finals: frozenset[str]
    reason: str


@dataclass(frozen=True)
class StagedFolder:
    """A folder of a set being written by several processes: `name` is its final name, `key`
    where the backend stages it (the local backend: the temporary folder's name). Plain and
    picklable, so the coordinator can send it to every rank."""

    name: str
    key: str


def folder_digest(parts: Mapping[str, tuple[int, str]]) -> tuple[int, str]:
    """`(total size, xxh3-64 hex digest)` of a folder from its parts' `{name: (size, checksum)}`:
    what manifests and journals record for a folder, so one checksum covers every part, its
    name and its size."""
    import json

    import xxhash

    listing: list[tuple[str, int, str]] = [
        (name, int(size), str(c)) for name, (size, c) in sorted(parts.items())
    ]
    digest = xxhash.xxh3_64(json.dumps(listing, separators=(",", ":")).encode()).hexdigest()
    return sum(size for _, size, _ in listing), digest


class PendingSwitchError(RuntimeError):
    """A save would write files of an earlier committed save that recovery cannot complete."""


class OpenedFile(ABC):
    """A file opened for loading: the very file that was checked is the one that is loaded."""

    name: str
    location: str
    size: int

    @abstractmethod
    def read_at(self, offset: int, size: int) -> bytes:
        """Up to `size` bytes from `offset` (fewer only at the end of the file)."""

    @abstractmethod
    def stream(self) -> IO[bytes]:
        """A new seekable binary file object over the whole file, positioned at 0."""

    @abstractmethod
    def checksum(self) -> tuple[int, str]:
        """`(size, xxh3-64 hex digest)` of the whole opened file."""

    @abstractmethod
    def local_path(self) -> str | None:
        """A file-system path naming exactly this file (for memory-mapping), or None."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> OpenedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SetTransaction(ABC):
    """One set being written: `stage` its files, then `commit` them with their manifests.

    Leaving the `begin_set` block without a commit (an exception) removes what was staged;
    the previous sets stay as they were.
    """

    sequence_floor: int = 0  # commit sequences of this save must be larger than this

    @abstractmethod
    def stage(self, name: str, write: WriteFn, expected_nbytes: int) -> WrittenFile:
        """Writes `name` through `write` into a staging place, hashed and durable; not visible
        to readers until `commit`."""

    @abstractmethod
    def commit(self, manifests: Sequence[tuple[str, bytes]], sequence: int) -> None:
        """Makes every staged file and the `(name, bytes)` manifests visible as one atomic
        switch. `sequence` orders saves (larger is newer)."""

    def stage_folder(self, name: str) -> StagedFolder:
        """Reserves a new, empty staged folder for the final folder `name` (a sharded checkpoint
        name): any process may then write parts into it with `Backend.write_part`. Never an
        existing checkpoint folder: a folder is always written whole, then switched."""
        raise NotImplementedError(f"{type(self).__name__} cannot stage folders (sharded checkpoints)")

    def add_folder(self, staged: StagedFolder, parts: Sequence[WrittenFile]) -> WrittenFile:
        """Adds a staged folder whose parts every process has written (and made durable) to this
        set; `parts` are what `write_part` returned on every rank. Checks the folder holds
        exactly those parts, makes its names durable, and returns the folder as one file: total
        size and `folder_digest` of its parts."""
        raise NotImplementedError(f"{type(self).__name__} cannot stage folders (sharded checkpoints)")

    def stage_same(self, name: str, same_as: str) -> WrittenFile | None:
        """Stages `name` with exactly the bytes of `same_as`, a file staged earlier in this save,
        without writing them again (a hard link on a local disk; a server-side copy where an
        object store has one), or returns None when the medium cannot: the caller then writes
        `name` itself through `stage`. Readers see two ordinary files with one checksum;
        deleting one name keeps the other. The default cannot."""
        return None


class Backend(ABC):
    """One folder on one medium. See the module docstring."""

    location: str  # the folder, as a path or URL, for messages

    # ---- navigation -------------------------------------------------------------------------
    @abstractmethod
    def child(self, name: str) -> Backend:
        """The backend of the subfolder `name` (which need not exist)."""

    @abstractmethod
    def exists_as(self) -> Literal["folder", "file", "missing"]:
        """What the folder's own location holds."""

    @abstractmethod
    def folders(self) -> list[str]:
        """Names of the subfolders."""

    @abstractmethod
    def ensure_folder(self) -> None:
        """Creates the folder (and its parents) durably where the medium has folders."""

    # ---- reading ----------------------------------------------------------------------------
    @abstractmethod
    def entries(self) -> list[Entry]:
        """Every entry of the folder except folders: regular files with their sizes, and the
        rest with their problem. Links are never followed."""

    @abstractmethod
    def read_small(self, name: str, max_bytes: int, what: str) -> bytes:
        """The bytes of the regular file `name`, refusing one over `max_bytes` (`what` names the
        kind of file in the error)."""

    @abstractmethod
    def open(self, name: str, follow_symlinks: bool = False) -> OpenedFile:
        """The regular file `name`, opened for loading. FileNotFoundError when missing;
        `UnsafeCheckpointError` for anything that is not a regular file (links unless
        `follow_symlinks`)."""

    @abstractmethod
    def checksum(self, name: str) -> tuple[int, str] | None:
        """`(size, xxh3-64 hex digest)` of the regular file `name`; None when missing or not a
        regular file."""

    # ---- writing ----------------------------------------------------------------------------
    @abstractmethod
    def begin_set(
        self, manifest_of: Mapping[str, str | None], needed_bytes: int
    ) -> contextlib.AbstractContextManager[SetTransaction]:
        """Starts a save that will write the files named in `manifest_of`, each mapped to the
        manifest of its set (the manifests themselves map to themselves; None: a file of no
        set), holding the folder lock until the block ends. Fails before anything is written
        when `needed_bytes` do not fit or a final name is blocked."""

    @abstractmethod
    def write_file(self, name: str, write: WriteFn, expected_nbytes: int = 0) -> WrittenFile:
        """Writes one file atomically (whole or not at all), outside any set."""

    def write_part(
        self, staged: StagedFolder, part: str, write: WriteFn, expected_nbytes: int = 0
    ) -> WrittenFile:
        """Writes the part file `part` into a folder staged by a set of this backend (possibly in
        another process), hashed while written and durable when it returns; never replaces a
        file. Any process of a sharded save calls it for its own parts."""
        raise NotImplementedError(f"{type(self).__name__} cannot write parts of a staged folder")

    @abstractmethod
    def delete(self, names: Sequence[str]) -> None:
        """Removes the files `names` (missing ones are skipped), durably."""

    def make_durable(self, names: Sequence[str]) -> None:
        """Makes files that something else wrote into the folder durable, with their names (a
        Hugging Face checkpoint before its folder manifest marks it complete). The default does
        nothing: media whose writes are durable once they return (object stores) need nothing."""
        return None

    def delete_set(self, manifest: str) -> None:
        """Deletes the committed set whose manifest is `manifest`, with every file it lists,
        crash-safely (retention calls it; the caller holds `lock()` and has decided the set may
        go).

        The protocol every backend keeps: (1) the delete is recorded durably before anything
        goes (a journal, or the set's commit record itself); (2) the set becomes invisible
        first: its manifest (commit record) is removed before any of its files, so no reader
        ever sees a manifest listing a missing file; (3) the files are removed; (4) the record
        is dropped. After a crash at any instant the folder holds the whole set or, once
        `recover` ran (it finishes an interrupted delete), nothing of it, so `ksuit verify`
        finds nothing to report. Files the manifest does not list (exports beside the set) stay.

        This default removes the manifest, then the files: a crash between the two leaves
        files no manifest lists (resume ignores them; `ksuit verify` reports them), so a backend
        overrides it. The local backend journals the delete (`ksuit.storage.local.deletion`);
        an object store deletes the commit record first, then the data objects, and its
        recovery removes data objects no commit record names.
        """
        from ksuit.storage.manifest import read_manifest  # the manifest module uses this one

        files = list(read_manifest(self, manifest).files)
        self.delete([manifest])
        self.delete(files)

    # ---- housekeeping ----------------------------------------------------------------------
    @abstractmethod
    def lock(self) -> contextlib.AbstractContextManager[object]:
        """Holds off set switches and recovery of other threads and processes."""

    @abstractmethod
    def recover(self) -> RecoveryReport:
        """Completes or discards an interrupted save, finishes an interrupted set delete;
        reports what it could not do."""

    def repair(self, grace_seconds: float | None = None) -> RecoveryReport:
        """Recovery that also removes leftovers younger than the backend's usual grace period:
        only those younger than `grace_seconds` are spared (`ksuit verify --repair --grace`).
        Where recovery spares nothing (the local backend), the same as `recover()`."""
        return self.recover()

    @abstractmethod
    def free_bytes(self) -> int | None:
        """Bytes that can still be written, or None when the medium does not say."""

    def file_location(self, name: str) -> str:
        """The path or URL of the file `name` in this folder, for messages."""
        return f"{self.location.rstrip('/')}/{name}"

    @property
    def ref(self) -> Path | str:
        """The folder as users name it: a `Path` on the local file system, else its URL."""
        return self.location

    def file_ref(self, name: str) -> Path | str:
        """The file `name` as users name it (see `ref`); `ksuit.load_file` takes it back."""
        return self.file_location(name)
