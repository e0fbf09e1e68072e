"""The local backend: checkpoint folders on a POSIX file system, and the crash-safety protocol
that makes their saves atomic (this docstring is the protocol's authoritative statement;
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
   each file is fsynced (the files of a save together, once all are written: `staging`). Then
   the folder is fsynced: the staged names are durable before the journal that names them (a
   file system may persist directory entries in any order). Before
   staging, a short disk fails with ENOSPC naming the path, the bytes needed and the bytes
   free, and a folder sitting at a final name fails the save; nothing is written either way.
   Every manifest is stamped with the save's commit sequence (`commit_sequence`), larger than
   that of each manifest it replaces and of each journal in the folder.
   A sharded checkpoint (`..._model.dcp/`, a folder of part files written by several
   processes) is staged as one unit: the coordinator, holding the folder lock, creates a new
   temporary folder `.<final>.<token>.tmp/`; every rank writes its own parts into it
   (`write_part`: created with `O_EXCL`, hashed while written, fsynced before the rank reports
   it); once every rank reported, the coordinator checks that the folder holds exactly the
   reported parts, fsyncs it and stages it with the total size and digest of its parts
   (`folder_digest`). A committed folder is never written into: a newer save stages a new one.
2. **Journal.** A journal `.ksuit-journal.<seq>.json` lists, in rename order, every staged file:
   its temporary and final name, size, checksum and the manifest of its set. It is written
   atomically (temp, fsync, rename, fsync of the folder). The instant its rename lands is the
   commit point of the save.
3. **Switch.** The renames are applied set by set (a set's files, then its manifest; a folder
   replacing a folder of an earlier save first moves that one aside to a temporary name, which
   is removed once the journal is gone), the folder is fsynced, the journal is removed and
   the folder fsynced again; then the save returns. A failure here leaves the journal; a
   writer looks for journals before every save and recovers first, so a failed switch is
   completed or discarded before anything newer is written.
4. **Recover.** Before a writer's first save in a process, before any save that finds a
   journal, and before resume or `ksuit verify` read the folder (`ksuit.storage.local.recovery`).
   Journals are untrusted: one is read only if it is a regular file (lstat, never through a
   symlink) of at most 4 MiB whose entries name plain files in the folder, each temporary name
   of ksuit's grammar for its final name; any other journal is refused with an error naming
   it before anything changes. Then, oldest first, a journal is *completed* when every file it
   lists is intact (size and checksum; a folder: exactly the parts of its recorded digest) at
   its temporary name or already renamed into place;
   *discarded* with its temporary files when one is not (the save never fully committed; the
   previous set was never touched, so it stands); never rolled forward over a set whose
   manifest carries a newer commit sequence; and *left pending*, reported, when it cannot be
   applied (a folder at a file's final name, a read-only folder). Finally the temporary files
   of ksuit's grammar that no pending journal names are deleted, and the temporary folders of
   sharded checkpoints (entries unlinked, links never followed; a subfolder inside is reported
   and left); nothing else is.

Files with identical bytes in one save (a progress tag's and `latest`'s optimizer state) are
staged once and *hard-linked* under the second name (`LocalSetTransaction.stage_same`; a copy
where the file system refuses links); each name is an ordinary file of its set, listed in the
journal with the same size and checksum, and deleting one keeps the other.

Retention deletes a committed set by a journal of its own (`ksuit.storage.local.deletion`):
journal first (the commit point of the delete), then the manifest (the set is invisible), then
the files; recovery finishes an interrupted delete.

A crash before the journal lands leaves the old set and some temporary files (deleted on
recovery); a crash after leaves a journal that recovery completes. Either way each manifest
describes exactly the files beside it, with sizes and checksums, and `ksuit verify` can prove it.
Under power loss the same holds where fsync of files and folders is honoured and rename is
atomic (local ext4, xfs, btrfs); folders a run creates are made durable too
(`ksuit.storage.local.files.make_folder_durable`).

Reading: only regular files are opened (`ksuit.storage.local.safe_files`): a symbolic link,
FIFO or device with a checkpoint's name is reported, never followed or opened. One writer
process per folder; readers may come and go: set switches, recovery and readers that need a
quiet folder hold the folder lock (`ksuit.storage.local.locking`: `flock` on the folder).

Modules: `files` (fsync, hashing sink, atomic single file, durable folders), `direct_io`
(O_DIRECT streams for large files), `staging` (stage, journal, switch), `folders` (staged
folders of sharded checkpoints), `deletion` (set deletes), `journal`, `recovery`, `locking`,
`safe_files`.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Literal

from ksuit.layout import is_part_filename, is_plain_filename, is_sharded_filename, temp_final_name
from ksuit.storage.backend import (
    Backend,
    Entry,
    OpenedFile,
    PendingSwitchError,
    RecoveryReport,
    SetTransaction,
    StagedFolder,
    WriteFn,
    WrittenFile,
)
from ksuit.storage.local.deletion import delete_set
from ksuit.storage.local.direct_io import open_stream
from ksuit.storage.local.files import (
    HashingSink,
    check_free_space,
    disk_free_bytes,
    fsync_dir,
    make_folder_durable,
    write_file_atomic,
)
from ksuit.storage.local.folders import is_real_folder, move_aside, remove_folder
from ksuit.storage.local.locking import folder_lock
from ksuit.storage.local.recovery import ensure_recovered, journal_sequences, recover_folder
from ksuit.storage.local.safe_files import (
    hash_mapped,
    hash_regular_file,
    not_regular_problem,
    open_regular,
    pinned_path,
    read_regular,
)
from ksuit.storage.local.staging import LocalSetTransaction, refuse_blocked_finals


class LocalFile(OpenedFile):
    """A regular local file opened once; every read goes through that one descriptor."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self.name = path.name
        self.location = str(path)
        self.fd = fd
        self.size = os.fstat(fd).st_size

    def read_at(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def stream(self) -> IO[bytes]:
        return os.fdopen(os.dup(self.fd), "rb")

    def local_path(self) -> str:
        return pinned_path(self.fd, self.path)

    def checksum(self) -> tuple[int, str]:
        return hash_mapped(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class LocalBackend(Backend):
    """A folder on a local file system (see the module docstring for the protocol)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.location = str(self.path)

    def __repr__(self) -> str:
        return f"LocalBackend({self.location!r})"

    def _file(self, name: str) -> Path:
        if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0"):
            raise ValueError(f"{name!r} is not a plain file name inside {self.path}")
        return self.path / name

    def file_location(self, name: str) -> str:
        return str(self.path / name)

    @property
    def ref(self) -> Path:
        return self.path

    def file_ref(self, name: str) -> Path:
        return self._file(name)

    # ---- navigation -------------------------------------------------------------------------
    def child(self, name: str) -> LocalBackend:
        return LocalBackend(self._file(name))

    def exists_as(self) -> Literal["folder", "file", "missing"]:
        try:
            mode = os.stat(self.path).st_mode
        except (FileNotFoundError, NotADirectoryError):
            return "missing"
        return "folder" if stat.S_ISDIR(mode) else "file"

    def folders(self) -> list[str]:
        with os.scandir(self.path) as entries:
            return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))

    def ensure_folder(self) -> None:
        make_folder_durable(self.path)

    # ---- reading ----------------------------------------------------------------------------
    def entries(self) -> list[Entry]:
        result = []
        with os.scandir(self.path) as it:
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:  # removed meanwhile
                    continue
                if stat.S_ISDIR(st.st_mode):
                    continue
                regular = stat.S_ISREG(st.st_mode)
                problem = None if regular else not_regular_problem(st.st_mode)
                file_id = f"{st.st_dev}:{st.st_ino}" if regular else None
                result.append(Entry(e.name, st.st_size, problem, file_id))
        return sorted(result, key=lambda x: x.name)

    def read_small(self, name: str, max_bytes: int, what: str) -> bytes:
        return read_regular(self._file(name), max_bytes, what)

    def open(self, name: str, follow_symlinks: bool = False) -> LocalFile:
        path = self._file(name)
        try:
            fd = open_regular(path, follow_symlinks=follow_symlinks)
        except (FileNotFoundError, NotADirectoryError):
            raise FileNotFoundError(2, f"checkpoint file {path} does not exist", str(path)) from None
        return LocalFile(path, fd)

    def checksum(self, name: str) -> tuple[int, str] | None:
        return hash_regular_file(self._file(name))

    # ---- writing ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def begin_set(self, manifest_of: Mapping[str, str | None], needed_bytes: int) -> Iterator[SetTransaction]:
        finals = list(manifest_of)
        for name in finals:
            if not is_plain_filename(name):
                raise ValueError(f"{name!r} is not a plain file name inside {self.path}")
        self.ensure_folder()
        ensure_recovered(self.path)
        with folder_lock(self.path):
            pending = journal_sequences(self.path)
            if pending:
                self._settle(finals)
                pending = journal_sequences(self.path)
            check_free_space(self.path, needed_bytes, what=self.path / finals[0] if finals else None)
            refuse_blocked_finals(self.path, finals)
            txn = LocalSetTransaction(
                self.path, dict(manifest_of), needed_bytes, max(pending, default=-1) + 1
            )
            try:
                yield txn
            except BaseException as e:
                error = txn.discard(e)
                if error is not None:
                    raise error from e
                raise
            if not txn.committed:
                txn.discard(None)

    def _settle(self, finals: Sequence[str]) -> None:
        """Completes or discards switches left by a failure; refuses a save that would write
        files of a committed save recovery cannot complete (it would be replayed over them)."""
        report = recover_folder(self.path)
        for pending in report.pending:
            clash = sorted(pending.finals & set(finals))
            if clash:
                raise PendingSwitchError(
                    f"cannot save {', '.join(clash)} in {self.path}: an earlier save of these files "
                    f"committed but is not complete. {pending.reason}"
                )

    def write_file(self, name: str, write: WriteFn, expected_nbytes: int = 0) -> WrittenFile:
        path = self._file(name)
        self.ensure_folder()

        def through_stream(sink: HashingSink) -> None:
            with open_stream(sink, expected_nbytes) as out:
                write(out)

        with folder_lock(self.path):
            size, checksum = write_file_atomic(path, through_stream, expected_nbytes or None)
        return WrittenFile(str(path), name, size, checksum)

    def write_part(
        self, staged: StagedFolder, part: str, write: WriteFn, expected_nbytes: int = 0
    ) -> WrittenFile:
        if temp_final_name(staged.key) != staged.name or not is_sharded_filename(staged.name):
            raise ValueError(f"{staged!r} is not a staged sharded checkpoint folder")
        if not is_part_filename(part):
            raise ValueError(f"{part!r} is not a part name of a sharded checkpoint folder")
        folder = self._file(staged.key)
        if not is_real_folder(folder):
            raise FileNotFoundError(
                2,
                f"the staged folder {folder} is gone: the save was abandoned by its coordinator",
                str(folder),
            )
        path = folder / part
        start = time.perf_counter()
        sink = HashingSink(path)  # O_EXCL: a part is written once, by one process
        try:
            with open_stream(sink, expected_nbytes) as out:
                write(out)
            sink.fsync_and_close()
        except BaseException:
            sink.close()
            path.unlink(missing_ok=True)
            raise
        return WrittenFile(str(path), part, sink.nbytes, sink.hexdigest(), time.perf_counter() - start)

    def delete(self, names: Sequence[str]) -> None:
        """Removes files and sharded checkpoint folders; a folder first moves to a temporary name
        (one atomic step), so a crash never leaves a partial folder under its checkpoint name."""
        paths = [self._file(n) for n in names]
        with folder_lock(self.path):
            removed, aside = False, []
            for path in paths:
                if is_sharded_filename(path.name) and is_real_folder(path):
                    aside.append(move_aside(path))
                    removed = True
                    continue
                try:
                    os.unlink(path)
                    removed = True
                except FileNotFoundError:
                    continue
            if removed:
                fsync_dir(self.path)
            for folder in aside:
                remove_folder(folder)

    def make_durable(self, names: Sequence[str]) -> None:
        paths = [self._file(n) for n in names]
        for path in paths:
            fd = open_regular(path)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(self.path)

    def delete_set(self, manifest: str) -> None:
        """Journaled: see `ksuit.storage.local.deletion`."""
        if not is_plain_filename(manifest):
            raise ValueError(f"{manifest!r} is not a plain file name inside {self.path}")
        with folder_lock(self.path):
            pending = journal_sequences(self.path)
            if pending:
                recover_folder(self.path)
                pending = journal_sequences(self.path)
            delete_set(self.path, manifest, max(pending, default=0))

    # ---- housekeeping ----------------------------------------------------------------------
    def lock(self) -> contextlib.AbstractContextManager[object]:
        return folder_lock(self.path)

    def recover(self) -> RecoveryReport:
        return recover_folder(self.path)

    def free_bytes(self) -> int | None:
        """Free bytes of the file system the folder is (or, before it exists, will be) on."""
        probe = self.path
        while not probe.is_dir() and probe.parent != probe:
            probe = probe.parent
        try:
            return disk_free_bytes(probe)
        except OSError:
            return None


__all__ = ["LocalBackend", "LocalFile"]
