"""Staged folders of sharded checkpoints on a local file system: creating one, hashing what it
holds, moving one aside and removing one safely (the protocol that uses them is in
`ksuit.storage.local`).

A sharded checkpoint (`..._model.dcp/`) is a folder of part files written by several processes.
It is staged like a file: a new temporary folder `.<final>.<token>.tmp/` in the checkpoint
folder, which every rank writes its parts into (`O_EXCL`: never over an existing file), hashed
and fsynced; the coordinator then fsyncs the folder and journals it with the digest of its
parts (`ksuit.storage.backend.folder_digest`). A committed folder is never written into again:
a newer save of the same name stages a new folder and the switch moves the old one aside.

Folders are untrusted like every file: a folder is hashed or removed only if it is a real
folder (lstat, never through a symbolic link); inside it only regular files with part names
count, and removal unlinks entries (a link is removed, never followed) but never descends into
a subfolder, which it reports instead.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from ksuit.layout import is_part_filename
from ksuit.storage.local.files import new_temp_path
from ksuit.storage.local.safe_files import hash_regular_file

MAX_PARTS = 100_000  # a sharded checkpoint holds one file per rank and a few more


def is_real_folder(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False


def make_staged_folder(final: Path) -> Path:
    """A new empty temporary folder for the folder `final` (its name becomes durable with the
    other staged names, when the commit fsyncs the checkpoint folder before the journal)."""
    temp = new_temp_path(final)
    os.mkdir(temp, 0o755)
    return temp


def folder_parts(path: Path) -> dict[str, tuple[int, str]] | str:
    """`{part name: (size, checksum)}` of a real folder, or what is wrong with it (not a folder,
    an entry that is not a regular file with a part name, too many entries)."""
    if not is_real_folder(path):
        return "is not a folder" if os.path.lexists(path) else "is missing"
    parts: dict[str, tuple[int, str]] = {}
    with os.scandir(path) as entries:
        for entry in entries:
            if len(parts) >= MAX_PARTS:
                return f"holds more than {MAX_PARTS} entries"
            if not is_part_filename(entry.name):
                return f"holds {entry.name[:100]!r}, which is not a part of a sharded checkpoint"
            hashed = hash_regular_file(Path(entry.path))
            if hashed is None:
                return f"holds {entry.name!r}, which is not a regular file"
            parts[entry.name] = hashed
    return parts


def listed_sizes(path: Path) -> dict[str, int]:
    """`{name: size}` of the regular files of a folder (one stat each, nothing read)."""
    sizes = {}
    with os.scandir(path) as entries:
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):
                sizes[entry.name] = st.st_size
    return sizes


def move_aside(final: Path) -> Path:
    """Renames the folder `final` to a new temporary name (which recovery removes when no
    journal names it) and returns that name: how a switch replaces a committed folder."""
    aside = new_temp_path(final)
    os.rename(final, aside)
    return aside


def remove_folder(path: Path) -> str | None:
    """Removes a staged, discarded or replaced folder: None when done (or nothing was there),
    else the problem that kept it (a subfolder inside, an entry that cannot be removed)."""
    if not is_real_folder(path):
        if os.path.lexists(path):
            os.unlink(path)  # a link or file where a folder was expected: only the entry goes
        return None
    with os.scandir(path) as entries:
        names = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
    for name, is_dir in names:
        if is_dir:
            return f"{path} holds the folder {name!r}, which ksuit never writes; move it away"
        try:
            os.unlink(path / name)
        except FileNotFoundError:
            continue
    try:
        os.rmdir(path)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return f"{path} gained entries while it was removed; remove it once no process writes it"
        raise
    return None
