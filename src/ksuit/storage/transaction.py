"""Writing a set of checkpoint files as one atomic switch (protocol in `ksuit.storage.atomic`)."""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ksuit.layout import journal_filename, manifest_filename
from ksuit.providers.path_provider import make_folder_durable
from ksuit.storage.atomic import (
    HashingSink,
    check_free_space,
    disk_free_bytes,
    enospc_error,
    fsync_dir,
    is_enospc,
    new_temp_path,
    write_file_atomic,
)
from ksuit.storage.errors import CorruptCheckpointError
from ksuit.storage.formats import get_format
from ksuit.storage.journal import JournalEntry, encode_journal
from ksuit.storage.locking import FolderLock, folder_lock
from ksuit.storage.manifest import Manifest, ManifestEntry, read_manifest
from ksuit.storage.recovery import RecoveryReport, ensure_recovered, journal_sequences, recover_folder

logger = logging.getLogger(__name__)

__all__ = [
    "FolderLock",
    "PendingFile",
    "PendingSwitchError",
    "RecoveryReport",
    "SetWriter",
    "WrittenFile",
    "folder_lock",
    "recover_folder",
]


class PendingSwitchError(RuntimeError):
    """A save would write files of an earlier committed save that recovery cannot complete."""


@dataclass
class PendingFile:
    """One file of a set: its final name, payload and format; `group`/`tag` choose its manifest
    (None: a standalone file with no manifest)."""

    filename: str
    payload: dict[str, Any]
    fmt: str = "torch"
    kind: str | None = None
    group: str | None = None
    tag: str | None = None
    training_iteration: dict[str, int] | None = None


@dataclass
class WrittenFile:
    path: Path
    size: int
    checksum: str
    seconds: float


@dataclass
class _Staged:
    """A file written under its temporary name, waiting for the switch."""

    temp: Path
    final: Path
    size: int
    checksum: str
    manifest: str | None

    def entry(self) -> JournalEntry:
        return JournalEntry(self.temp.name, self.final.name, self.size, self.checksum, self.manifest)


_SEQUENCE_LOCK = threading.Lock()
_LAST_SEQUENCE = 0


def next_sequence(at_least: int = 0) -> int:
    """A commit sequence larger than every one this process gave out and than `at_least`
    (clock steps back cannot make a newer save look older)."""
    global _LAST_SEQUENCE
    with _SEQUENCE_LOCK:
        _LAST_SEQUENCE = max(time.time_ns(), _LAST_SEQUENCE + 1, at_least)
        return _LAST_SEQUENCE


class SetWriter:
    """Writes sets of files into one folder with the stage/journal/switch protocol.

    Before every save it recovers the folder when a journal is present (a switch of this or
    another writer failed after its commit point; also once per process in any case), so a
    failed switch is completed or discarded before anything newer is written.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def estimate_nbytes(self, files: list[PendingFile]) -> int:
        return sum(get_format(f.fmt).estimate_nbytes(f.payload) for f in files)

    def write_set(self, files: list[PendingFile], run_id: str | None = None) -> list[WrittenFile]:
        if not files:
            return []
        make_folder_durable(self.folder)
        ensure_recovered(self.folder)
        with folder_lock(self.folder):
            pending = journal_sequences(self.folder)
            if pending:
                self._settle(files)
                pending = journal_sequences(self.folder)
            return self._write_set_locked(files, run_id, max(pending, default=-1) + 1)

    def _settle(self, files: list[PendingFile]) -> None:
        """Completes or discards switches left by a failure; refuses a save that would write
        files of a committed save recovery cannot complete (it would be replayed over them)."""
        report = recover_folder(self.folder)
        finals = {f.filename for f in files} | {m for f in files if (m := _manifest_of(f)) is not None}
        for pending in report.pending:
            clash = sorted(pending.finals & finals)
            if clash:
                raise PendingSwitchError(
                    f"cannot save {', '.join(clash)} in {self.folder}: an earlier save of these files "
                    f"committed but is not complete. {pending.reason}"
                )

    def _write_set_locked(
        self, files: list[PendingFile], run_id: str | None, floor: int
    ) -> list[WrittenFile]:
        """Stages, commits and switches one set; `floor`: the least commit sequence it may take."""
        needed = self.estimate_nbytes(files)
        check_free_space(self.folder, needed, what=self.folder / files[0].filename)
        bases = self._base_manifests(files)
        self._check_targets([f.filename for f in files] + [m.filename for m in bases.values()])
        # newer than every journal left in the folder and every manifest this save replaces
        floor = max([floor] + [(m.commit_sequence or 0) + 1 for m in bases.values()])
        sequence = next_sequence(floor)
        staging = _Staging(self.folder)
        try:
            written = [staging.add(f.filename, _payload_writer(f), _manifest_of(f)) for f in files]
            for m in self._updated_manifests(bases, files, written, run_id, sequence):
                staging.add(m.filename, lambda sink, m=m: sink.write(m.to_json().encode()), m.filename)
            fsync_dir(self.folder)  # the staged names are durable before the journal naming them
            order = _switch_order(staging.staged)
            journal = self.folder / journal_filename(sequence)
            staging.current = journal
            entries = [x.entry() for x in order]
            write_file_atomic(journal, lambda s: s.write(encode_journal(sequence, entries)))
        except BaseException as e:
            error = staging.discard(e, needed)
            if error is not None:
                raise error from e
            raise
        _switch(self.folder, journal, order)
        return written

    def _check_targets(self, names: list[str]) -> None:
        """A folder at a final name would make the switch fail after its commit point: refuse
        the save before anything is written."""
        for name in names:
            path = self.folder / name
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(mode):
                raise IsADirectoryError(
                    errno.EISDIR,
                    f"cannot save {path}: a folder is in the way of this checkpoint file; move or "
                    "remove it and save again (nothing of this save was written)",
                    str(path),
                )

    def _base_manifests(self, files: list[PendingFile]) -> dict[tuple[str, str], Manifest]:
        bases: dict[tuple[str, str], Manifest] = {}
        for f in files:
            if f.group is not None and f.tag is not None and (f.group, f.tag) not in bases:
                bases[(f.group, f.tag)] = self._load_or_new_manifest(f.group, f.tag)
        return bases

    def _updated_manifests(
        self,
        bases: dict[tuple[str, str], Manifest],
        files: list[PendingFile],
        written: list[WrittenFile],
        run_id: str | None,
        sequence: int,
    ) -> list[Manifest]:
        for f, w in zip(files, written, strict=True):
            if f.group is None or f.tag is None:
                continue
            m = bases[(f.group, f.tag)]
            m.files[f.filename] = ManifestEntry(w.size, w.checksum, f.kind, f.training_iteration)
            m.training_iteration = f.training_iteration
            m.run_id = run_id
            m.commit_sequence = sequence
        return list(bases.values())

    def _load_or_new_manifest(self, group: str, tag: str) -> Manifest:
        path = self.folder / manifest_filename(group, tag)
        if path.exists():
            try:
                return read_manifest(path)
            except CorruptCheckpointError as e:
                logger.warning("replacing unreadable manifest: %s", e)
        return Manifest(group=group, tag=tag)


def _payload_writer(f: PendingFile) -> Any:
    return lambda sink: get_format(f.fmt).write(f.payload, sink)


def _manifest_of(f: PendingFile) -> str | None:
    return manifest_filename(f.group, f.tag) if f.group is not None and f.tag is not None else None


class _Staging:
    """The temporary files of one save, and their removal when the save fails before its commit."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.staged: list[_Staged] = []
        self.temps: list[Path] = []
        self.current: Path = folder  # what was being written, for an ENOSPC message
        self.sink: HashingSink | None = None

    def add(self, filename: str, write: Any, manifest: str | None) -> WrittenFile:
        final = self.folder / filename
        self.current = final
        tmp = new_temp_path(final)
        start = time.perf_counter()
        self.sink = sink = HashingSink(tmp)
        self.temps.append(tmp)
        try:
            write(sink)
            sink.fsync_and_close()
        finally:
            sink.close()
        self.staged.append(_Staged(tmp, final, sink.nbytes, sink.hexdigest(), manifest))
        return WrittenFile(final, sink.nbytes, sink.hexdigest(), time.perf_counter() - start)

    def discard(self, error: BaseException, needed: int) -> OSError | None:
        """Removes every temporary file; returns the ENOSPC error to raise when the disk is full."""
        full = is_enospc(error, self.sink)
        free = disk_free_bytes(self.folder) if full else 0  # before cleanup frees the staged bytes
        for tmp in self.temps:
            tmp.unlink(missing_ok=True)
        return enospc_error(self.current, needed, free) if full else None


def _switch_order(staged: list[_Staged]) -> list[_Staged]:
    """Rename order: standalone files, then set by set its files and its manifest last, so a
    switch that fails part-way leaves the sets before the failure complete."""
    order = [s for s in staged if s.manifest is None]
    manifests = {s.final.name: s for s in staged if s.manifest == s.final.name}
    for name, manifest in manifests.items():
        order += [s for s in staged if s.manifest == name and s is not manifest]
        order.append(manifest)
    return order


def _switch(folder: Path, journal: Path, order: list[_Staged]) -> None:
    """Applies the renames of a committed save and removes its journal. A failure here leaves
    the journal: the next save (or `ksuit verify`, or resume) completes the switch first."""
    try:
        for s in order:
            os.replace(s.temp, s.final)
        fsync_dir(folder)
        os.unlink(journal)
        fsync_dir(folder)
    except BaseException as e:
        e.add_note(f"this save committed ({journal}); the next save, resume or `ksuit verify` completes it")
        raise
