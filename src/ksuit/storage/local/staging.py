"""One set written into a local folder: staged files, the journal, the switch (the protocol is in
`ksuit.storage.local`)."""

from __future__ import annotations

import errno
import functools
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ksuit.layout import journal_filename
from ksuit.storage.backend import SetTransaction, WriteFn, WriteStream, WrittenFile
from ksuit.storage.local.direct_io import open_stream
from ksuit.storage.local.files import (
    HashingSink,
    disk_free_bytes,
    enospc_error,
    fsync_dir,
    is_enospc,
    new_temp_path,
    write_file_atomic,
)
from ksuit.storage.local.journal import JournalEntry, encode_journal

COPY_CHUNK = 8 << 20


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


def refuse_blocked_finals(folder: Path, names: Sequence[str]) -> None:
    """A folder at a final name would make the switch fail after its commit point: refuse the
    save before anything is written."""
    for name in names:
        path = folder / name
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


class LocalSetTransaction(SetTransaction):
    """The temporary files of one save; `commit` journals and switches them, `discard` removes
    them when the save fails before its commit point.

    `manifest_of` maps each final name to the manifest of its set (None for a standalone
    file): the journal records it, so recovery never replays a set a later save replaced.
    """

    def __init__(self, folder: Path, manifest_of: dict[str, str | None], needed_bytes: int, floor: int):
        self.folder = folder
        self.manifest_of = manifest_of
        self.needed_bytes = needed_bytes
        self.sequence_floor = floor
        self.staged: list[_Staged] = []
        self.temps: list[Path] = []
        self.current: Path = folder  # what is being written, for an ENOSPC message
        self.sink: HashingSink | None = None
        self.committed = False

    def stage(self, name: str, write: WriteFn, expected_nbytes: int) -> WrittenFile:
        return self._stage(name, write, expected_nbytes, self.manifest_of.get(name))

    def _stage(self, name: str, write: WriteFn, expected_nbytes: int, manifest: str | None) -> WrittenFile:
        final = self.folder / name
        self.current = final
        tmp = new_temp_path(final)
        start = time.perf_counter()
        self.sink = sink = HashingSink(tmp)
        self.temps.append(tmp)
        try:
            with open_stream(sink, expected_nbytes) as out:
                write(out)
            sink.fsync_and_close()
        finally:
            sink.close()
        self.staged.append(_Staged(tmp, final, sink.nbytes, sink.hexdigest(), manifest))
        return WrittenFile(str(final), name, sink.nbytes, sink.hexdigest(), time.perf_counter() - start)

    def stage_same(self, name: str, same_as: str) -> WrittenFile:
        """`name` as a hard link of the staged `same_as` (one inode, its bytes written once), or,
        where the file system refuses links, a copy of its bytes; either way staged like any
        file: the journal lists it with the same size and checksum, and the switch renames it."""
        source = next((s for s in self.staged if s.final.name == same_as), None)
        if source is None:
            raise ValueError(f"{same_as!r} is not staged in this save; stage it before {name!r}")
        final = self.folder / name
        self.current = final
        tmp = new_temp_path(final)
        start = time.perf_counter()
        self.temps.append(tmp)
        shared: str | None = same_as
        try:
            os.link(source.temp, tmp)
        except OSError:  # EXDEV, EPERM, EMLINK, ENOTSUP, ...: the bytes once more
            shared = None
            self._copy(source, tmp)
        self.staged.append(_Staged(tmp, final, source.size, source.checksum, self.manifest_of.get(name)))
        seconds = time.perf_counter() - start
        return WrittenFile(str(final), name, source.size, source.checksum, seconds, shared_with=shared)

    def _copy(self, source: _Staged, tmp: Path) -> None:
        self.sink = sink = HashingSink(tmp)
        fd = os.open(source.temp, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            while chunk := os.read(fd, COPY_CHUNK):
                sink.write(chunk)
            sink.fsync_and_close()
        finally:
            os.close(fd)
            sink.close()
        if (sink.nbytes, sink.hexdigest()) != (source.size, source.checksum):
            raise OSError(errno.EIO, f"the copy {tmp} of {source.temp} differs from it; nothing was saved")

    def commit(self, manifests: Sequence[tuple[str, bytes]], sequence: int) -> None:
        for name, data in manifests:
            self._stage(name, functools.partial(_write_all, data=data), len(data), name)
        fsync_dir(self.folder)  # the staged names are durable before the journal naming them
        order = _switch_order(self.staged)
        journal = self.folder / journal_filename(sequence)
        self.current = journal
        entries = [x.entry() for x in order]
        write_file_atomic(journal, functools.partial(_write_all, data=encode_journal(sequence, entries)))
        self.committed = True  # from here on, recovery completes the save
        _switch(self.folder, journal, order)

    def discard(self, error: BaseException | None) -> OSError | None:
        """Removes every temporary file of a save that did not commit; returns the ENOSPC error
        to raise instead of `error` when the disk is full."""
        if self.committed:
            return None
        full = is_enospc(error, self.sink)
        free = disk_free_bytes(self.folder) if full else 0  # before cleanup frees the staged bytes
        for tmp in self.temps:
            tmp.unlink(missing_ok=True)
        return enospc_error(self.current, self.needed_bytes, free) if full else None


def _write_all(out: WriteStream, data: bytes) -> None:
    out.write(data)


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
