"""Writing a set of checkpoint files as one atomic switch (protocol in `ksuit.storage.atomic`)."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ksuit.layout import is_journal_filename, is_temp_filename, journal_filename, manifest_filename
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
from ksuit.storage.manifest import Manifest, ManifestEntry, read_manifest

logger = logging.getLogger(__name__)

_RECOVERED: set[str] = set()
_REGISTRY_LOCK = threading.Lock()


class FolderLock:
    """Set switches, recovery and readers that must see a quiet folder never interleave.

    Between threads of a process: a reentrant lock. Between processes: `flock` on the folder
    itself (no lock file is created), taken by the outermost holder in a process. So
    `ksuit verify` or a resume in another process waits for a save in flight to finish instead
    of deleting its staged files as leftovers. The kernel drops the lock when its holder dies.
    Where the file system refuses `flock`, only the in-process lock applies.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self._rlock = threading.RLock()
        self._depth = 0
        self._fd = -1

    def __enter__(self) -> FolderLock:
        self._rlock.acquire()
        if self._depth == 0:
            self._fd = _flock_folder(self.folder)
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0 and self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        self._rlock.release()


def _flock_folder(folder: Path) -> int:
    """An fd of `folder` holding an exclusive flock (blocking), or -1 where that is impossible."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        os.close(fd)
        return -1
    return fd


_FOLDER_LOCKS: dict[str, FolderLock] = {}


def _forget_locks_in_child() -> None:
    """A forked child (e.g. a DataLoader worker) must not inherit locks held by other threads of
    its parent, nor keep the parent's flock alive through an inherited descriptor."""
    global _REGISTRY_LOCK
    for lock in _FOLDER_LOCKS.values():
        if lock._fd >= 0:
            try:
                os.close(lock._fd)
            except OSError:
                pass
    _FOLDER_LOCKS.clear()
    _REGISTRY_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_locks_in_child)


def folder_lock(folder: Path) -> FolderLock:
    """One lock per folder: set switches and recovery never interleave, across threads and
    processes (see `FolderLock`)."""
    key = str(Path(folder).resolve())
    with _REGISTRY_LOCK:
        lock = _FOLDER_LOCKS.get(key)
        if lock is None:
            lock = _FOLDER_LOCKS[key] = FolderLock(Path(key))
        return lock


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
class RecoveryReport:
    rolled_forward: list[str] = field(default_factory=list)
    removed_temps: list[str] = field(default_factory=list)


def _apply_journal(folder: Path, journal: Path) -> list[str]:
    try:
        renames = json.loads(journal.read_text())["renames"]
    except (ValueError, KeyError) as e:  # a journal is written atomically; this means outside damage
        raise CorruptCheckpointError(
            f"journal {journal} is unreadable ({e}); delete it to discard that save"
        ) from e
    applied = []
    for tmp_name, final_name in renames:
        tmp = folder / tmp_name
        if tmp.exists():
            os.replace(tmp, folder / final_name)
            applied.append(final_name)
    fsync_dir(folder)
    journal.unlink()
    fsync_dir(folder)
    return applied


def recover_folder(folder: str | Path) -> RecoveryReport:
    """Rolls committed set switches forward and removes leftovers of uncommitted ones."""
    folder = Path(folder)
    report = RecoveryReport()
    if not folder.is_dir():
        return report
    with folder_lock(folder):
        journals = sorted(p for p in folder.iterdir() if is_journal_filename(p.name))
        for journal in journals:
            report.rolled_forward.extend(_apply_journal(folder, journal))
        for path in folder.iterdir():
            if is_temp_filename(path.name):
                path.unlink(missing_ok=True)
                report.removed_temps.append(path.name)
        if report.removed_temps:
            fsync_dir(folder)
    if report.rolled_forward:
        logger.warning(
            "completed an interrupted checkpoint save in %s: %s", folder, ", ".join(report.rolled_forward)
        )
    if report.removed_temps:
        logger.info("removed %d leftover temporary files in %s", len(report.removed_temps), folder)
    return report


def ensure_recovered(folder: Path) -> None:
    """Recovery once per folder and process, when the first writer starts on it."""
    key = str(folder.resolve())
    with _REGISTRY_LOCK:
        if key in _RECOVERED:
            return
        _RECOVERED.add(key)
    recover_folder(folder)


class SetWriter:
    """Writes sets of files into one folder with the stage/journal/switch protocol."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def estimate_nbytes(self, files: list[PendingFile]) -> int:
        return sum(get_format(f.fmt).estimate_nbytes(f.payload) for f in files)

    def write_set(self, files: list[PendingFile], run_id: str | None = None) -> list[WrittenFile]:
        if not files:
            return []
        self.folder.mkdir(parents=True, exist_ok=True)
        ensure_recovered(self.folder)
        with folder_lock(self.folder):
            return self._write_set_locked(files, run_id)

    def _write_set_locked(self, files: list[PendingFile], run_id: str | None) -> list[WrittenFile]:
        needed = self.estimate_nbytes(files)
        check_free_space(self.folder, needed, what=self.folder / files[0].filename)
        staged: list[tuple[Path, Path]] = []
        written: list[WrittenFile] = []
        current: Path = self.folder
        sink: HashingSink | None = None
        try:
            for f in files:
                final = self.folder / f.filename
                current = final
                tmp = new_temp_path(final)
                start = time.perf_counter()
                sink = HashingSink(tmp)
                staged.append((tmp, final))
                try:
                    get_format(f.fmt).write(f.payload, sink)
                    sink.fsync_and_close()
                finally:
                    sink.close()
                written.append(WrittenFile(final, sink.nbytes, sink.hexdigest(), time.perf_counter() - start))
            for manifest in self._updated_manifests(files, written, run_id):
                final = self.folder / manifest.filename
                current = final
                tmp = new_temp_path(final)
                sink = HashingSink(tmp)
                staged.append((tmp, final))
                try:
                    sink.write(manifest.to_json().encode())
                    sink.fsync_and_close()
                finally:
                    sink.close()
            renames = [[tmp.name, final.name] for tmp, final in staged]
            journal = self.folder / journal_filename(time.time_ns())
            current = journal
            write_file_atomic(journal, lambda s: s.write(json.dumps({"renames": renames}).encode()))
        except BaseException as e:
            full = is_enospc(e, sink)
            free = disk_free_bytes(self.folder) if full else 0  # before cleanup frees the staged bytes
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
            if full:
                raise enospc_error(current, needed, free) from e
            raise
        _apply_journal(self.folder, journal)
        return written

    def _updated_manifests(
        self, files: list[PendingFile], written: list[WrittenFile], run_id: str | None
    ) -> list[Manifest]:
        manifests: dict[tuple[str, str], Manifest] = {}
        for f, w in zip(files, written, strict=True):
            if f.group is None or f.tag is None:
                continue
            key = (f.group, f.tag)
            if key not in manifests:
                manifests[key] = self._load_or_new_manifest(f.group, f.tag)
            m = manifests[key]
            m.files[f.filename] = ManifestEntry(w.size, w.checksum, f.kind, f.training_iteration)
            m.training_iteration = f.training_iteration
            m.run_id = run_id
        return list(manifests.values())

    def _load_or_new_manifest(self, group: str, tag: str) -> Manifest:
        path = self.folder / manifest_filename(group, tag)
        if path.exists():
            try:
                return read_manifest(path)
            except CorruptCheckpointError as e:
                logger.warning("replacing unreadable manifest: %s", e)
        return Manifest(group=group, tag=tag)
