"""Writing a set of checkpoint files through any backend: payloads become files in their
formats, each (group, tag) gets its updated manifest, and the backend commits them together.

`SetWriter` is the synchronous writer; `ksuit.storage.async_writer.AsyncSetWriter` wraps one to
write in the background. Both have the `SetSink` interface the checkpoint writer uses.

Bytes are written once per save: a file whose payload is the very object of an earlier file of
the same save (a progress tag's and `latest`'s optimizer state) is staged as the same bytes
(`SetTransaction.stage_same`: a hard link on local disk), unless the backend cannot.

`SaveHooks` (retention, `ksuit.retention`) run on the thread that writes: before a save is
staged, with the folder lock held, and after it committed or failed.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ksuit.layout import manifest_filename
from ksuit.storage.backend import Backend, Location, WriteFn, WriteStream, WrittenFile
from ksuit.storage.errors import CorruptCheckpointError
from ksuit.storage.formats import get_format
from ksuit.storage.locations import open_backend
from ksuit.storage.manifest import Manifest, ManifestEntry, read_manifest

logger = logging.getLogger(__name__)


@dataclass
class PendingFile:
    """One file of a set: its final name, payload and format; `group`/`tag` choose its manifest
    (None: a standalone file with no manifest). `role` is what the file holds: model, optim or
    trainer."""

    filename: str
    payload: dict[str, Any]
    fmt: str = "torch"
    role: str | None = None
    group: str | None = None
    tag: str | None = None
    training_iteration: dict[str, int] | None = None
    metrics: dict[str, float] | None = None  # recorded in the manifest of its set

    @property
    def manifest(self) -> str | None:
        """The file name of the manifest of its set (None for a standalone file)."""
        return (
            manifest_filename(self.group, self.tag)
            if self.group is not None and self.tag is not None
            else None
        )

    def with_payload(self, payload: dict[str, Any]) -> PendingFile:
        return dataclasses.replace(self, payload=payload)


OnWritten = Callable[[list[WrittenFile]], None]


class SaveHooks(Protocol):
    """What runs around each save on the thread that writes it (a retention policy,
    `ksuit.retention.Retention`)."""

    def before_save(self, backend: Backend, files: list[PendingFile], needed_bytes: int) -> None:
        """Before anything of the save is written, with the folder lock held: may delete sets to
        make room for `needed_bytes`, or raise `OSError(ENOSPC)` so that nothing is written."""

    def after_save(
        self, backend: Backend, files: list[PendingFile], committed: Mapping[str, int] | None
    ) -> None:
        """After the save: `committed` maps each manifest it wrote whole (every file of the set
        written by this save) to its commit sequence; None when the save failed."""


class SetSink(Protocol):
    """What the checkpoint writer hands its sets to: `SetWriter` or `AsyncSetWriter`."""

    @property
    def backend(self) -> Backend: ...

    def write_set(
        self, files: list[PendingFile], run_id: str | None = None, on_written: OnWritten | None = None
    ) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


_SEQUENCE_LOCK = threading.Lock()
_LAST_SEQUENCE = 0


def next_sequence(at_least: int = 0) -> int:
    """A commit sequence larger than every one this process gave out and than `at_least`
    (clock steps back cannot make a newer save look older)."""
    global _LAST_SEQUENCE
    with _SEQUENCE_LOCK:
        _LAST_SEQUENCE = max(time.time_ns(), _LAST_SEQUENCE + 1, at_least)
        return _LAST_SEQUENCE


def estimate_nbytes(files: list[PendingFile]) -> int:
    """Bytes the files of a set will take (an estimate from their tensors); a payload that two
    files share is written once."""
    unique = {(id(f.payload), f.fmt): f for f in files}
    return sum(get_format(f.fmt).estimate_nbytes(f.payload) for f in unique.values())


class SetWriter:
    """Writes sets of files into one folder of a backend, each as one atomic commit; `hooks`
    run around every save (see `SaveHooks`)."""

    def __init__(self, folder: Backend | Location, hooks: SaveHooks | None = None):
        self._backend = open_backend(folder)
        self.hooks = hooks

    @property
    def backend(self) -> Backend:
        return self._backend

    def write_set(
        self, files: list[PendingFile], run_id: str | None = None, on_written: OnWritten | None = None
    ) -> None:
        written = self.write(files, run_id)
        if on_written is not None:
            on_written(written)

    def write(self, files: list[PendingFile], run_id: str | None = None) -> list[WrittenFile]:
        """Writes `files` and the updated manifests of their sets as one commit; returns what
        was written (manifests not included)."""
        if not files:
            return []
        if self.hooks is None:
            return self._write(files, run_id)[0]
        committed: dict[str, int] | None = None
        try:
            self._backend.ensure_folder()
            with self._backend.lock():  # what the hook decides holds until the save committed
                self.hooks.before_save(self._backend, files, estimate_nbytes(files))
                written, committed = self._write(files, run_id)
        finally:
            self.hooks.after_save(self._backend, files, committed)
        return written

    def _write(
        self, files: list[PendingFile], run_id: str | None
    ) -> tuple[list[WrittenFile], dict[str, int]]:
        manifest_of: dict[str, str | None] = {f.filename: f.manifest for f in files}
        manifest_of.update({m: m for f in files if (m := f.manifest) is not None})
        with self._backend.begin_set(manifest_of, estimate_nbytes(files)) as txn:
            bases = self._base_manifests(files)
            # newer than the backend's own floor and every manifest this save replaces
            floor = max([txn.sequence_floor] + [(m.commit_sequence or 0) + 1 for m in bases.values()])
            sequence = next_sequence(floor)
            written: list[WrittenFile] = []
            first_of: dict[tuple[int, str], str] = {}  # (payload object, format) -> first file name
            for f in files:
                key = (id(f.payload), f.fmt)
                same = first_of.get(key)
                w = txn.stage_same(f.filename, same) if same is not None else None
                if w is None:
                    w = txn.stage(
                        f.filename, _payload_writer(f), get_format(f.fmt).estimate_nbytes(f.payload)
                    )
                    first_of.setdefault(key, f.filename)
                written.append(w)
            manifests = _updated_manifests(bases, files, written, run_id, sequence)
            txn.commit([(m.filename, m.to_json().encode()) for m in manifests], sequence)
        names = {f.filename for f in files}
        whole = {m.filename: sequence for m in manifests if set(m.files) <= names}
        return written, whole

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def _base_manifests(self, files: list[PendingFile]) -> dict[tuple[str, str], Manifest]:
        bases: dict[tuple[str, str], Manifest] = {}
        for f in files:
            if f.group is not None and f.tag is not None and (f.group, f.tag) not in bases:
                bases[(f.group, f.tag)] = self._load_or_new_manifest(f.group, f.tag)
        return bases

    def _load_or_new_manifest(self, group: str, tag: str) -> Manifest:
        try:
            return read_manifest(self._backend, manifest_filename(group, tag))
        except FileNotFoundError:
            pass
        except CorruptCheckpointError as e:
            logger.warning("replacing unreadable manifest: %s", e)
        return Manifest(group=group, tag=tag)


def _payload_writer(f: PendingFile) -> WriteFn:
    fmt = get_format(f.fmt)

    def write(out: WriteStream) -> None:
        fmt.write(f.payload, out)

    return write


def _updated_manifests(
    bases: dict[tuple[str, str], Manifest],
    files: list[PendingFile],
    written: list[WrittenFile],
    run_id: str | None,
    sequence: int,
) -> list[Manifest]:
    metrics: dict[tuple[str, str], dict[str, float] | None] = {}
    for f, w in zip(files, written, strict=True):
        if f.group is None or f.tag is None:
            continue
        m = bases[(f.group, f.tag)]
        m.files[f.filename] = ManifestEntry(w.size, w.checksum, f.role, f.training_iteration)
        m.training_iteration = f.training_iteration
        m.run_id = run_id
        m.commit_sequence = sequence
        if metrics.get((f.group, f.tag)) is None:
            metrics[(f.group, f.tag)] = f.metrics
    for key, m in bases.items():
        found = metrics.get(key)
        m.metrics = dict(found) if found else None  # the set is of this save now
    return list(bases.values())
