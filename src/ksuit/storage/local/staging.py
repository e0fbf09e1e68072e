"""One set written into a local folder: staged files, the journal, the switch (the protocol is in
`ksuit.storage.local`).

Durability of the staged files is batched: each file is written and kept open, and at commit
every staged file (manifests included) is fsynced at once from several threads, then the folder
once, and only then the journal is written. A file system commits concurrent fsyncs together
(ext4's journal groups them): on the `make bench` disk 41 small files took about 150 ms fsynced
one after the other and about 15-20 ms fsynced from 8 threads, against 8 ms for the same bytes in
one file. A set of more than `MAX_OPEN_STAGED` files is synced in batches of that many, so a
save never holds more descriptors.
"""

from __future__ import annotations

import errno
import functools
import io
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from typing_extensions import Buffer

from ksuit.layout import is_sharded_filename, journal_filename
from ksuit.storage.backend import (
    SetTransaction,
    StagedFolder,
    WriteFn,
    WriteStream,
    WrittenFile,
    folder_digest,
)
from ksuit.storage.local.direct_io import MIN_DIRECT_BYTES, open_stream
from ksuit.storage.local.files import (
    HashingSink,
    disk_free_bytes,
    enospc_error,
    fsync_dir,
    is_enospc,
    new_temp_path,
    write_file_atomic,
)
from ksuit.storage.local.folders import (
    is_real_folder,
    listed_sizes,
    make_staged_folder,
    move_aside,
    remove_folder,
)
from ksuit.storage.local.journal import JournalEntry, encode_journal

logger = logging.getLogger(__name__)

COPY_CHUNK = 8 << 20

MAX_OPEN_STAGED = 256  # staged files kept open for one fsync batch
# smaller files are serialized into memory and written with one call: torch.save hands a file
# over in ~50 pieces, and each piece through a Python stream costs more than the copy
IN_MEMORY_BYTES = 4 << 20
FSYNC_THREADS = 8  # concurrent fsyncs a batch uses at most


def fsync_all(sinks: Sequence[HashingSink]) -> None:
    """fsyncs and closes every sink, several at a time (see the module docstring); raises the
    first error after every sink is closed."""
    pending = list(sinks)
    errors: list[tuple[HashingSink, BaseException]] = []
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                if not pending:
                    return
                sink = pending.pop()
            try:
                sink.fsync_and_close()
            except BaseException as e:  # raised below, on the saving thread
                with lock:
                    errors.append((sink, e))

    try:
        _FSYNC_WORKERS.run(work, min(FSYNC_THREADS, len(pending)) - 1)
    finally:
        for sink in sinks:
            sink.close()
    if errors:
        sink, error = errors[0]
        if isinstance(error, OSError):
            sink.record_error(error)
        raise error


class _Workers:
    """Kept threads that run the same function beside the caller, for fsync batches (starting
    threads for every save cost more than the fsyncs of a small set). Where no thread can be
    started (interpreter shutdown) the caller does the work alone."""

    def __init__(self) -> None:
        self.forget()

    def forget(self) -> None:
        """A fresh start (in a forked child the threads stayed in the parent)."""
        self._lock = threading.Lock()
        self._queues: list[queue.SimpleQueue[tuple[Callable[[], None], threading.Event]]] = []

    def run(self, work: Callable[[], None], helpers: int) -> None:
        with self._lock:
            while len(self._queues) < helpers:
                jobs: queue.SimpleQueue[tuple[Callable[[], None], threading.Event]] = queue.SimpleQueue()
                thread = threading.Thread(target=_serve, args=(jobs,), name="ksuit-fsync", daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # can't create new thread at interpreter shutdown
                    break
                self._queues.append(jobs)
            queues = self._queues[: max(helpers, 0)]
        done = [threading.Event() for _ in queues]
        for jobs, event in zip(queues, done, strict=True):
            jobs.put((work, event))
        try:
            work()
        finally:
            for event in done:
                event.wait()


def _serve(jobs: queue.SimpleQueue[tuple[Callable[[], None], threading.Event]]) -> None:
    while True:
        work, done = jobs.get()
        try:
            work()  # never raises: `work` keeps its errors
        finally:
            done.set()


_FSYNC_WORKERS = _Workers()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_FSYNC_WORKERS.forget)


@dataclass
class _Staged:
    """A file written under its temporary name, waiting for the switch."""

    temp: Path
    final: Path
    size: int
    checksum: str
    manifest: str | None
    folder: bool = False  # a staged folder (sharded checkpoint), switched whole

    def entry(self) -> JournalEntry:
        return JournalEntry(self.temp.name, self.final.name, self.size, self.checksum, self.manifest)


def refuse_blocked_finals(folder: Path, names: Sequence[str]) -> None:
    """A folder at a file's final name, or anything but a folder at a sharded checkpoint's,
    would make the switch fail after its commit point: refuse the save before anything is
    written."""
    for name in names:
        path = folder / name
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        if is_sharded_filename(name):
            if not stat.S_ISDIR(mode):
                raise FileExistsError(
                    errno.EEXIST,
                    f"cannot save {path}: a file or link is in the way of this sharded checkpoint "
                    "folder; move or remove it and save again (nothing of this save was written)",
                    str(path),
                )
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
        self.temp_folders: dict[str, Path] = {}  # final name -> staged folder
        self.current: Path = folder  # what is being written, for an ENOSPC message
        self.sink: HashingSink | None = None
        self.unsynced: list[HashingSink] = []  # written, open, not yet fsynced
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
            if expected_nbytes < IN_MEMORY_BYTES:  # written whole: no Python per piece
                memory = io.BytesIO()
                write(memory)
                sink.write(memory.getbuffer())
            elif expected_nbytes < MIN_DIRECT_BYTES:
                buffered = _Buffered(sink)  # torch.save writes a small file in ~50 pieces
                write(buffered)
                buffered.flush()
            else:
                with open_stream(sink, expected_nbytes) as out:
                    write(out)
        except BaseException:
            sink.close()
            raise
        self.unsynced.append(sink)  # fsynced with the others before the journal names it
        if len(self.unsynced) >= MAX_OPEN_STAGED:
            self._sync_staged()
        self.staged.append(_Staged(tmp, final, sink.nbytes, sink.hexdigest(), manifest))
        return WrittenFile(str(final), name, sink.nbytes, sink.hexdigest(), time.perf_counter() - start)

    def _sync_staged(self) -> None:
        sinks, self.unsynced = self.unsynced, []
        try:
            fsync_all(sinks)
        except BaseException:
            self.sink = next((s for s in sinks if s.error is not None), self.sink)
            if self.sink is not None:
                self.current = self.sink.path
            raise

    def stage_folder(self, name: str) -> StagedFolder:
        if not is_sharded_filename(name) or name not in self.manifest_of:
            raise ValueError(f"{name!r} is not a sharded checkpoint folder of this save")
        if name in self.temp_folders:
            raise ValueError(f"{name!r} is already staged in this save")
        final = self.folder / name
        self.current = final
        temp = make_staged_folder(final)
        self.temp_folders[name] = temp
        return StagedFolder(name, temp.name)

    def add_folder(self, staged: StagedFolder, parts: Sequence[WrittenFile]) -> WrittenFile:
        temp = self.temp_folders.get(staged.name)
        if temp is None or temp.name != staged.key:
            raise ValueError(f"{staged.name!r} was not staged by this save")
        expected = {p.name: (p.size, p.checksum) for p in parts}
        if len(expected) != len(parts):
            raise ValueError(f"two processes wrote the same part of {staged.name}")
        found = listed_sizes(temp)
        sizes = {name: size for name, (size, _) in expected.items()}
        if found != sizes:
            raise RuntimeError(
                f"the staged folder {temp} holds {sorted(found)} but the ranks wrote {sorted(sizes)}; "
                "the save is abandoned (the previous checkpoint is intact)"
            )
        fsync_dir(temp)  # every rank's part names are durable before the journal names them
        size, checksum = folder_digest(expected)
        final = self.folder / staged.name
        self.staged.append(_Staged(temp, final, size, checksum, self.manifest_of.get(staged.name), True))
        return WrittenFile(str(final), staged.name, size, checksum)

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
        self._sync_staged()  # every staged file durable ...
        fsync_dir(self.folder)  # ... and its name, before the journal naming them
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
        for sink in self.unsynced:
            sink.close()
        full = is_enospc(error, self.sink)
        free = disk_free_bytes(self.folder) if full else 0  # before cleanup frees the staged bytes
        for tmp in self.temps:
            tmp.unlink(missing_ok=True)
        for temp in self.temp_folders.values():
            remove_folder(temp)  # what it cannot remove, recovery reports later
        return enospc_error(self.current, self.needed_bytes, free) if full else None


class _Buffered:
    """Collects small writes and hands them to the sink in pieces of `SIZE` bytes (one system
    call and one hash update each); larger writes go through at once."""

    SIZE = 1 << 20

    def __init__(self, sink: HashingSink):
        self.sink = sink
        self.buffer = bytearray()

    def write(self, data: Buffer, /) -> int:
        view = memoryview(data).cast("B")
        n = view.nbytes
        if len(self.buffer) + n > self.SIZE:
            self.flush()
        if n >= self.SIZE:
            self.sink.write(view)
        else:
            self.buffer += view
        return n

    def tell(self) -> int:
        return self.sink.nbytes + len(self.buffer)

    def flush(self) -> None:
        if self.buffer:
            data, self.buffer = self.buffer, bytearray()
            self.sink.write(data)

    def writable(self) -> bool:
        return True


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
    the journal: the next save (or `ksuit verify`, or resume) completes the switch first.

    The files replaced (the previous set) and the journal are held open while they are renamed
    over or unlinked, and let go of by a helper thread: freeing a file's blocks happens when its
    last reference goes, and took 2.5 ms per file inside `rename` on the `make bench` disk (ext4
    with `discard`), most of a small set's save.

    A folder replaces the folder of an earlier save in two renames: the old one moves aside to a
    temporary name, the new one takes its place; a crash between them leaves the journal, and
    recovery renames the staged folder into place and removes the old one."""
    held = [fd for fd in (_hold(s.final) for s in order if not s.folder) if fd is not None]
    replaced: list[Path] = []
    try:
        for s in order:
            if s.folder and is_real_folder(s.final):
                replaced.append(move_aside(s.final))
            os.replace(s.temp, s.final)
        fsync_dir(folder)
        held += [fd for fd in [_hold(journal)] if fd is not None]
        os.unlink(journal)
        fsync_dir(folder)
    except BaseException as e:
        e.add_note(f"this save committed ({journal}); the next save, resume or `ksuit verify` completes it")
        raise
    finally:
        _RELEASER.release(held)
    for old in replaced:  # no longer any set's: what is left is a temporary folder recovery removes
        try:
            problem = remove_folder(old)
        except OSError as e:
            problem = f"could not remove {old} ({e})"
        if problem:
            logger.warning("after a save: %s; recovery removes it later", problem)


def _hold(path: Path) -> int | None:
    """A reference to the file at `path` that reads and writes nothing (O_PATH), or None."""
    flags = getattr(os, "O_PATH", 0)
    if not flags:
        return None
    try:
        return os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None


class _Releaser:
    """Closes descriptors in a helper thread (inline where no thread can be started)."""

    def __init__(self) -> None:
        self._fds: list[int] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def forget(self) -> None:
        """A fresh start (in a forked child: the thread stayed in the parent; the child closes
        its copies of the descriptors waiting to be closed)."""
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = None

    def release(self, fds: list[int]) -> None:
        if not fds:
            return
        with self._lock:
            self._fds += fds
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="ksuit-release", daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # can't create new thread at interpreter shutdown
                    fds, self._fds = self._fds, []
                    for fd in fds:
                        os.close(fd)
                    return
                self._thread = thread
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            with self._lock:
                self._wake.clear()
                fds, self._fds = self._fds, []
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass


_RELEASER = _Releaser()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_RELEASER.forget)
