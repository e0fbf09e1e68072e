"""Durable local files: fsync of files and folders, the hashing sink every staged file streams
through, the single-file atomic write, durable folders and free-space checks (the protocol that
uses them is in `ksuit.storage.local`)."""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

import xxhash
from typing_extensions import Buffer

from ksuit.layout import temp_filename


def fsync_dir(path: str | Path) -> None:
    """Makes a folder's entries (new names, renames, deletions) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_folder_durable(path: str | Path) -> Path:
    """Creates `path` and its missing parents and fsyncs every parent whose entries changed, so
    that a power cut cannot lose the folder (and with it every checkpoint later written and
    fsynced inside it). An existing folder costs one `stat`."""
    path = Path(path)
    missing: list[Path] = []
    probe = path
    while not probe.is_dir():
        if probe.exists() or probe.is_symlink():
            if probe.is_dir():  # created meanwhile by another thread or process
                break
            raise NotADirectoryError(f"{probe} is in the way of the folder {path}; move it away")
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder)
        except FileExistsError as e:  # created meanwhile by another process, which fsyncs its parent
            if not folder.is_dir():
                raise NotADirectoryError(f"{folder} is in the way of the folder {path}; move it away") from e
            continue
        fsync_dir(folder.parent)
    return path


def disk_free_bytes(folder: str | Path) -> int:
    return shutil.disk_usage(folder).free


def enospc_error(path: str | Path, needed: int, free: int | None = None, at_least: bool = False) -> OSError:
    """An ENOSPC OSError that names the path, the bytes needed and the bytes free."""
    if free is None:
        try:
            free = disk_free_bytes(Path(path).parent)
        except OSError:
            free = -1
    if 0 <= needed <= free:  # the file system said no space although the bytes are free
        cause = (
            f"the file system reported no space left while {free} bytes are free (a quota, an inode "
            "limit or another writer); free space or raise the limit"
        )
    else:
        cause = (
            f"only {free} bytes are free; free disk space or point the run at a larger disk"
            if free >= 0
            else "free disk space or point the run at a larger disk"
        )
    return OSError(
        errno.ENOSPC,
        f"No space left on device: writing {path} needs {'at least ' if at_least else ''}{needed} bytes "
        f"but {cause} (the previous checkpoint is intact)",
        str(path),
    )


def check_free_space(folder: str | Path, needed: int, what: str | Path | None = None) -> None:
    """Raises ENOSPC before writing when `needed` bytes do not fit in `folder`."""
    free = disk_free_bytes(folder)
    if needed > free:
        raise enospc_error(what or folder, needed, free)


class HashingSink:
    """A new file opened for writing that hashes (xxh3-64) and counts every byte on its way out.

    Bytes come in file order, through `write` or, when a caller placed them itself (the O_DIRECT
    stream), through `account`.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd = os.open(
            self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644
        )
        self._hash = xxhash.xxh3_64()
        self.nbytes = 0
        self.attempted = 0  # bytes asked to be written, including a write that failed
        self.error: OSError | None = None  # kept: torch.save turns it into a bare RuntimeError

    def write(self, data: Buffer, /) -> int:
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
        """The descriptor of the file, for writers that place bytes themselves."""
        return self._fd

    def account(self, data: Buffer) -> None:
        """Hashes and counts bytes a caller wrote at the end of the file itself; they must come
        in file order, like `write`."""
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self.attempted += view.nbytes
        self.nbytes += view.nbytes

    def record_error(self, error: OSError) -> None:
        """Remembers an error of a write the caller made itself (for `is_enospc`)."""
        self.error = error

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


def is_enospc(exc: BaseException | None, sink: HashingSink | None = None) -> bool:
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
