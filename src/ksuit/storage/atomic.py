"""Atomic files: the crash-safety protocol of ksuit (this docstring is its authoritative statement;
docs/crash-safety.md explains it with the tests that prove it).

Protocol
--------
A checkpoint save writes a *set* of files (weights, optimizer states, trainer state, for one
tag or for a progress tag and `latest`). ksuit guarantees that after a crash at any instant,
every tag names either its complete previous set or its complete new set, never a mix, and
that a save that returned is not lost.

1. **Stage.** Every new file, including the updated manifest of each (group, tag), is written
   under a temporary name in the destination folder: `.<final name>.<token>.tmp`, the token 8
   random hex digits. Temporary names start with '.' and never end in `.th`, so no reader
   mistakes them for checkpoints. Bytes stream through an xxh3-64 hash while they are written;
   each file is fsynced. Then the folder is fsynced: the staged names are durable before the
   journal that names them (a file system may persist directory entries in any order). Before
   staging, a short disk fails with ENOSPC naming the path, the bytes needed and the bytes
   free, and a folder sitting at a final name fails the save; nothing is written either way.
   Every manifest is stamped with the save's commit sequence (`commit_sequence`), larger than
   that of each manifest it replaces and of each journal in the folder.
2. **Journal.** A journal `.ksuit-journal.<seq>.json` lists, in rename order, every staged file:
   its temporary and final name, size, checksum and the manifest of its set. It is written
   atomically (temp, fsync, rename, fsync of the folder). The instant its rename lands is the
   commit point of the save.
3. **Switch.** The renames are applied set by set (a set's files, then its manifest), the
   folder is fsynced, the journal is removed and the folder fsynced again; then the save
   returns. A failure here leaves the journal; a writer looks for journals before every save
   and recovers first, so a failed switch is completed or discarded before anything newer is
   written.
4. **Recover.** Before a writer's first save in a process, before any save that finds a
   journal, and before resume or `ksuit verify` read the folder (`ksuit.storage.recovery`).
   Journals are untrusted: one is read only if it is a regular file (lstat, never through a
   symlink) of at most 4 MiB whose entries name plain files in the folder, each temporary name
   of ksuit's grammar for its final name; any other journal is refused with an error naming
   it before anything changes. Then, oldest first, a journal is *completed* when every file it
   lists is intact (size and checksum) at its temporary name or already renamed into place;
   *discarded* with its temporary files when one is not (the save never fully committed; the
   previous set was never touched, so it stands); never rolled forward over a set whose
   manifest carries a newer commit sequence; and *left pending*, reported, when it cannot be
   applied (a folder at a final name, a read-only folder). Finally the temporary files of
   ksuit's grammar that no pending journal names are deleted; no other file is.

A crash before the journal lands leaves the old set and some temporary files (deleted on
recovery); a crash after leaves a journal that recovery completes. Either way each manifest
describes exactly the files beside it, with sizes and checksums, and `ksuit verify` can prove it.
Under power loss the same holds where fsync of files and folders is honoured and rename is
atomic (local ext4, xfs, btrfs); folders a run creates are made durable too
(`ksuit.providers.path_provider.make_folder_durable`).

This module holds the primitives: fsync of files and folders, the single-file atomic write and
the hashing sink that every writer streams through.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import xxhash

from ksuit.layout import temp_filename

CHECKSUM_ALGORITHM = "xxh3_64"


def fsync_dir(path: str | Path) -> None:
    """Makes a folder's entries (new names, renames, deletions) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_free_bytes(folder: str | Path) -> int:
    return shutil.disk_usage(folder).free


def enospc_error(path: str | Path, needed: int, free: int | None = None, at_least: bool = False) -> OSError:
    """An ENOSPC OSError that names the path, the bytes needed and the bytes free."""
    if free is None:
        try:
            free = disk_free_bytes(Path(path).parent)
        except OSError:
            free = -1
    err = OSError(
        errno.ENOSPC,
        f"No space left on device: writing {path} needs {'at least ' if at_least else ''}{needed} bytes but "
        f"only {free} bytes are free; free disk space or point the run at a larger disk "
        "(the previous checkpoint is intact)",
        str(path),
    )
    return err


def check_free_space(folder: str | Path, needed: int, what: str | Path | None = None) -> None:
    """Raises ENOSPC before writing when `needed` bytes do not fit in `folder`."""
    free = disk_free_bytes(folder)
    if needed > free:
        raise enospc_error(what or folder, needed, free)


class HashingSink:
    """A write-only binary file that hashes (xxh3-64) and counts every byte on its way out."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd = os.open(
            self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644
        )
        self._hash = xxhash.xxh3_64()
        self.nbytes = 0
        self.attempted = 0  # bytes asked to be written, including a write that failed
        self.error: OSError | None = None  # kept: torch.save turns it into a bare RuntimeError

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._hash.update(view)
        total = view.nbytes
        self.attempted += total
        written = 0
        try:
            while written < total:
                written += os.write(self._fd, view[written:])
        except OSError as e:
            self.error = e
            raise
        self.nbytes += total
        return total

    def fileno(self) -> int:
        """The descriptor of the temporary file, for writers that place bytes themselves."""
        return self._fd

    def account(self, data) -> None:
        """Hashes and counts bytes a caller wrote at the end of the file itself (e.g. through
        O_DIRECT); they must come in file order, like `write`."""
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self.attempted += view.nbytes
        self.nbytes += view.nbytes

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.nbytes

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def fsync_and_close(self) -> None:
        try:
            os.fsync(self._fd)
        finally:
            self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def is_enospc(exc: BaseException, sink: HashingSink | None = None) -> bool:
    """Whether a failed write ran out of space, even when a serializer (torch.save reports
    "enforce fail at inline_container.cc") replaced the OSError by its own error."""
    if sink is not None and sink.error is not None and sink.error.errno == errno.ENOSPC:
        return True
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def new_temp_path(final_path: Path) -> Path:
    return final_path.with_name(temp_filename(final_path.name, secrets.token_hex(4)))


def write_file_atomic(
    final_path: str | Path, write: Callable[[HashingSink], None], expected_nbytes: int | None = None
) -> tuple[int, str]:
    """Writes one file atomically: temp name, fsync, rename, folder fsync.

    Returns `(size, checksum)`. On any failure the temporary file is removed and the old file
    (if any) is untouched; a full disk raises ENOSPC naming the path, the bytes needed
    (`expected_nbytes` when known, else at least what was attempted) and the bytes free.
    """
    final_path = Path(final_path)
    tmp = new_temp_path(final_path)
    sink = HashingSink(tmp)
    try:
        write(sink)
        sink.fsync_and_close()
        os.replace(tmp, final_path)
    except BaseException as e:
        sink.close()
        full = is_enospc(e, sink)
        free = disk_free_bytes(final_path.parent) if full else 0  # before the temp file is removed
        tmp.unlink(missing_ok=True)
        if full:
            if expected_nbytes is not None and expected_nbytes >= sink.attempted:
                raise enospc_error(final_path, expected_nbytes, free) from e
            raise enospc_error(final_path, sink.attempted, free, at_least=True) from e
        raise
    fsync_dir(final_path.parent)
    return sink.nbytes, sink.hexdigest()


def hash_file(path: str | Path, chunk_size: int = 16 << 20) -> tuple[int, str]:
    """`(size, xxh3-64 hex digest)` of a file, read in large chunks."""
    h = xxhash.xxh3_64()
    size = 0
    with open(path, "rb", buffering=0) as f:
        # a small file needs a small buffer (zero-filling 16 MiB costs more than hashing 100 KiB)
        buf = bytearray(max(1, min(chunk_size, os.fstat(f.fileno()).st_size + 1)))
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            size += n
    return size, h.hexdigest()


def hash_regular_file(path: str | Path, chunk_size: int = 16 << 20) -> tuple[int, str] | None:
    """`(size, xxh3-64 hex digest)` of a regular file, or None when `path` is missing, a
    symlink (never followed), a folder or anything else."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):  # never open a device or a FIFO
            return None
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EISDIR):
            return None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        h = xxhash.xxh3_64()
        size = 0
        while chunk := os.read(fd, max(1, min(chunk_size, st.st_size + 1))):
            h.update(chunk)
            size += len(chunk)
        return size, h.hexdigest()
    finally:
        os.close(fd)
