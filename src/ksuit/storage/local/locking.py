"""One lock per checkpoint folder: set switches, recovery and readers that need a quiet folder
never interleave, across threads and processes."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

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
