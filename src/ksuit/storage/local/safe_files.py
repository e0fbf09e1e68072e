"""Opening files of a run folder without trusting them: regular files only, never waiting.

A run folder is untrusted input. Any name in it may be a FIFO (opening it for reading waits for
a writer forever), a device (`/dev/zero` never ends), or a symbolic link to a file outside the
folder (whose size or contents must not be reported). So every checkpoint and manifest read
goes through `open_regular`: it looks at the entry itself first (`lstat` when links are not
followed), opens it with `O_NONBLOCK` (a FIFO that slipped in between does not block) and
`O_NOFOLLOW` (a link that slipped in is refused by the kernel), and checks with `fstat` that
what was opened is a regular file before a single byte is read.

Rule for checkpoint folders: checkpoint files and manifests must be regular files. A symbolic
link, even one pointing inside the folder, is reported as a problem and never followed. A path
a user passes explicitly (`ksuit inspect FILE`, `load_model(path)`) may be a link to a regular
file.
"""

from __future__ import annotations

import mmap
import os
import stat
from pathlib import Path

import xxhash

from ksuit.storage.errors import UnsafeCheckpointError

_PROC_FD = Path("/proc/self/fd")


def file_kind(mode: int) -> str:
    """A file type in words: `'FIFO'`, `'symbolic link'`, ... (`'regular file'` for S_ISREG)."""
    for test, name in (
        (stat.S_ISREG, "regular file"),
        (stat.S_ISDIR, "folder"),
        (stat.S_ISLNK, "symbolic link"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return "special file"


def not_regular_problem(mode: int) -> str:
    """What is wrong with a folder entry that is not a regular file (for reports)."""
    return (
        f"is a {file_kind(mode)}, not a regular file; ksuit never follows links or opens special "
        "files in a run folder: replace it with the real file or delete it"
    )


def _refuse(path: Path, mode: int) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(f"refusing to read {path}: it {not_regular_problem(mode)}")


def open_regular(path: str | Path, follow_symlinks: bool = False) -> int:
    """A read-only descriptor of the regular file `path`.

    Raises `FileNotFoundError` when it does not exist, `IsADirectoryError` for a folder and
    `UnsafeCheckpointError` (naming the path) for a FIFO, device, socket, or, unless
    `follow_symlinks`, a symbolic link. Never blocks and never reads a byte of anything else.
    """
    path = Path(path)
    st = os.stat(path, follow_symlinks=follow_symlinks)
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(21, f"{path} is a folder; pass a checkpoint file", str(path))
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(path, st.st_mode)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if os.path.islink(path):  # swapped for a link since the stat (ELOOP)
            raise _refuse(path, stat.S_IFLNK) from None
        raise e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # swapped since the stat
            raise _refuse(path, st.st_mode)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def pinned_path(fd: int, path: str | Path) -> str:
    """A path that names exactly the file open as `fd`, for libraries that want a path
    (`/proc/self/fd/<fd>` on Linux: renaming or replacing `path` meanwhile changes nothing)."""
    return str(_PROC_FD / str(fd)) if _PROC_FD.is_dir() else str(path)


def read_regular(path: str | Path, max_bytes: int, what: str, follow_symlinks: bool = False) -> bytes:
    """The bytes of a regular file of at most `max_bytes` (`what` names it in the error)."""
    fd = open_regular(path, follow_symlinks=follow_symlinks)
    try:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise UnsafeCheckpointError(
                f"refusing to read {path}: it is {size} bytes, more than the {max_bytes} bytes a {what} "
                "may have; it is not a file ksuit wrote: delete it or restore it from a backup"
            )
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(max_bytes + 1)[:max_bytes]
    finally:
        os.close(fd)


def hash_fd(fd: int, chunk_size: int = 16 << 20) -> tuple[int, str]:
    """`(size, xxh3-64 hex digest)` of the open file `fd` from its start (the manifest checksum)."""
    h = xxhash.xxh3_64()
    size = 0
    # a small file needs a small buffer (zero-filling 16 MiB costs more than hashing 100 KiB)
    buf = bytearray(max(1, min(chunk_size, os.fstat(fd).st_size + 1)))
    view = memoryview(buf)
    offset = 0
    while True:
        n = os.preadv(fd, [buf], offset) if hasattr(os, "preadv") else _pread_into(fd, buf, offset)
        if not n:
            break
        h.update(view[:n])
        size += n
        offset += n
    return size, h.hexdigest()


def hash_mapped(fd: int, chunk_size: int = 16 << 20) -> tuple[int, str]:
    """`hash_fd` through a read-only mapping of the file: no copy into a buffer, and the pages
    it reads stay in the page cache for a memory-mapped load of the same file right after (what
    resume does: each file read from the disk once). Files that cannot be mapped (empty,
    special) are read with `hash_fd`."""
    size = os.fstat(fd).st_size
    try:
        mapped = mmap.mmap(fd, size, access=mmap.ACCESS_READ) if size else None
    except (OSError, ValueError):
        mapped = None
    if mapped is None:
        return hash_fd(fd, chunk_size)
    h = xxhash.xxh3_64()
    try:  # default read-ahead: MADV_SEQUENTIAL would let the kernel drop the pages the load needs
        with memoryview(mapped) as view:
            for offset in range(0, size, chunk_size):
                h.update(view[offset : offset + chunk_size])
    finally:
        mapped.close()
    return size, h.hexdigest()


def _pread_into(fd: int, buf: bytearray, offset: int) -> int:  # pragma: no cover - non-Linux
    data = os.pread(fd, len(buf), offset)
    buf[: len(data)] = data
    return len(data)


def hash_regular_file(path: str | Path) -> tuple[int, str] | None:
    """`(size, xxh3-64 hex digest)` of the regular file `path`, or None when it is missing, a
    symbolic link (never followed), a folder or any other special file."""
    try:
        fd = open_regular(path, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, UnsafeCheckpointError):
        return None
    try:
        return hash_fd(fd)
    finally:
        os.close(fd)
