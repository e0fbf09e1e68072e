"""Crash states of a save, in the spirit of ALICE and CrashMonkey.

`Recorder` wraps the `os` functions ksuit's storage calls (open/create, write, pwrite,
ftruncate, fsync, close, rename/replace, link, unlink, mkdir) while a save runs, and records
every operation on one checkpoint folder, with the bytes written. A hard link is a second name
of the same file (inode): both names show the same bytes. Wrapping `os` rather than routing
storage through a hook records the protocol of any version of the code, old or new.

`crash_states` then builds the folder contents a power cut at each point could leave:

- **ordered** (ext4/xfs `data=ordered`-like): every operation before the crash point happened,
  in order; file data not yet fsynced may be missing (the file holds what its last fsync saw).
- **reorder** (POSIX): only what was made durable survives for sure. A directory operation
  (create, rename, link, unlink, mkdir) is durable once a later fsync of its folder completed; the
  others may each be lost, in any combination. Unsynced file data is kept, truncated to what
  was synced, or zeroed.

Crash points are the instants before each operation that is not a data write (a partly
written file is covered by the data variants). For `m` pending directory operations the
subsets lost are all of them when `m <= ENUMERATE_UP_TO`, else: none, all, each single one,
all but each single one, and each pair (CrashMonkey's bounded exploration). Equal states are
checked once.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

DIR_OPS = ("create", "rename", "link", "unlink")  # mkdir of a subfolder: recorded, never in a save
ENUMERATE_UP_TO = 5


@dataclass
class Op:
    kind: str  # create | write | truncate | fsync | close | rename | link | unlink | mkdir | fsync_dir | mark
    name: str | None = None
    ino: int | None = None
    dst: str | None = None
    offset: int = 0
    data: bytes = b""
    label: dict | None = None


@dataclass
class Recording:
    initial: dict[str, bytes]
    initial_inos: dict[str, int] = field(default_factory=dict)
    ops: list[Op] = field(default_factory=list)
    initial_label: dict | None = None  # what the folder held before recording (a returned save)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for op in self.ops:
            out[op.kind] = out.get(op.kind, 0) + 1
        return out


class Recorder:
    """`with Recorder(folder) as rec:` records every file-system operation on `folder`'s own
    entries (not deeper) by any code in this process; `rec.mark(...)` adds a labelled event
    (e.g. "the save of update 3 returned")."""

    _PATCHED = ("open", "write", "pwrite", "ftruncate", "fsync", "fdatasync", "close", "replace", "rename")
    _PATCHED += ("unlink", "remove", "mkdir", "link")

    def __init__(self, folder: Path, initial_label: dict | None = None):
        self.folder = os.path.realpath(folder)
        self.recording = Recording(initial={}, initial_label=initial_label)
        self._lock = threading.RLock()
        self._names: dict[str, int] = {}
        self._next_ino = 0
        self._file_fds: dict[int, int] = {}  # fd -> ino, for fds that may write
        self._dir_fds: set[int] = set()
        self._content: dict[int, bytearray] = {}  # what this recorder believes each file holds
        self._real: dict[str, object] = {}

    # ---- public ---------------------------------------------------------------------------
    def mark(self, **label: object) -> None:
        with self._lock:
            self.recording.ops.append(Op("mark", label=dict(label)))

    def __enter__(self) -> Recorder:
        by_inode: dict[tuple[int, int], int] = {}  # hard links already in the folder share an ino
        for name in sorted(os.listdir(self.folder)):
            path = os.path.join(self.folder, name)
            if not os.path.isfile(path) or os.path.islink(path):
                raise AssertionError(f"the recorder models plain files only, found {path}")
            with open(path, "rb") as f:
                data = f.read()
            self.recording.initial[name] = data
            st = os.stat(path)
            ino = by_inode.get((st.st_dev, st.st_ino))
            if ino is None:
                ino = by_inode[(st.st_dev, st.st_ino)] = self._new_ino()
            self._names[name] = ino
            self.recording.initial_inos[name] = ino
            self._content[ino] = bytearray(data)
        for name in self._PATCHED:
            self._real[name] = getattr(os, name)
            setattr(os, name, getattr(self, f"_{name}"))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, fn in self._real.items():
            setattr(os, name, fn)

    # ---- helpers --------------------------------------------------------------------------
    def _new_ino(self) -> int:
        self._next_ino += 1
        return self._next_ino

    def _where(self, path: object) -> tuple[str, str | None]:
        """("in", name) for an entry of the folder, ("folder", None) for the folder itself,
        ("deeper", None) inside a subfolder, ("out", None) elsewhere."""
        if isinstance(path, int):
            return "out", None
        text = os.fsdecode(os.fspath(path))
        full = os.path.abspath(text)
        if os.path.realpath(full) == self.folder:
            return "folder", None
        parent = os.path.realpath(os.path.dirname(full))
        if parent == self.folder:
            return "in", os.path.basename(full)
        if parent.startswith(self.folder + os.sep):
            return "deeper", None
        return "out", None

    def _add(self, op: Op) -> None:
        self.recording.ops.append(op)

    # ---- wrapped os functions -------------------------------------------------------------
    def _open(self, path, flags, mode=0o777, *, dir_fd=None):
        real = self._real["open"]
        if dir_fd is not None:
            return real(path, flags, mode, dir_fd=dir_fd)
        where, name = self._where(path)
        if where == "deeper" and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise AssertionError(f"the recorder models one folder; {path} is deeper")
        if where == "folder":
            fd = real(path, flags, mode)
            with self._lock:
                self._dir_fds.add(fd)
            return fd
        if where != "in":
            return real(path, flags, mode)
        with self._lock:
            existed = os.path.lexists(path)
            fd = real(path, flags, mode)
            if not existed and flags & os.O_CREAT:
                ino = self._new_ino()
                self._names[name] = ino
                self._content[ino] = bytearray()
                self._add(Op("create", name=name, ino=ino))
            if flags & (os.O_WRONLY | os.O_RDWR):
                ino = self._names[name]
                self._file_fds[fd] = ino
                if existed and flags & os.O_TRUNC:
                    self._content[ino] = bytearray()
                    self._add(Op("truncate", ino=ino, offset=0))
            return fd

    def _record_write(self, fd: int, data, offset: int, n: int) -> None:
        ino = self._file_fds[fd]
        chunk = bytes(memoryview(data).cast("B")[:n])
        content = self._content[ino]
        if len(content) < offset:
            content.extend(bytes(offset - len(content)))
        content[offset : offset + n] = chunk
        self._add(Op("write", ino=ino, offset=offset, data=chunk))

    def _write(self, fd, data):
        if fd not in self._file_fds:
            return self._real["write"](fd, data)
        with self._lock:
            offset = os.lseek(fd, 0, os.SEEK_CUR)
            n = self._real["write"](fd, data)
            self._record_write(fd, data, offset, n)
            return n

    def _pwrite(self, fd, data, offset):
        if fd not in self._file_fds:
            return self._real["pwrite"](fd, data, offset)
        with self._lock:
            n = self._real["pwrite"](fd, data, offset)
            self._record_write(fd, data, offset, n)
            return n

    def _ftruncate(self, fd, length):
        self._real["ftruncate"](fd, length)
        if fd in self._file_fds:
            with self._lock:
                ino = self._file_fds[fd]
                content = self._content[ino]
                del content[length:]
                content.extend(bytes(length - len(content)))
                self._add(Op("truncate", ino=ino, offset=length))

    def _sync(self, fd: int, real_name: str) -> None:
        self._real[real_name](fd)
        with self._lock:
            if fd in self._dir_fds:
                self._add(Op("fsync_dir"))
            elif fd in self._file_fds:
                ino = self._file_fds[fd]
                self._check_content(fd, ino)
                self._add(Op("fsync", ino=ino))

    def _fsync(self, fd):
        self._sync(fd, "fsync")

    def _fdatasync(self, fd):
        self._sync(fd, "fdatasync")

    def _check_content(self, fd: int, ino: int) -> None:
        """The recorder saw every byte: what it believes the file holds is what it holds."""
        with open(f"/proc/self/fd/{fd}", "rb") as f:
            actual = f.read()
        if actual != bytes(self._content[ino]):
            raise AssertionError("a write to a checkpoint file bypassed the recorder")

    def _close(self, fd):
        with self._lock:
            self._file_fds.pop(fd, None)
            self._dir_fds.discard(fd)
            return self._real["close"](fd)

    def _rename_like(self, real_name: str, src, dst, **kw):
        (ws, src_name), (wd, dst_name) = self._where(src), self._where(dst)
        if ws != "in" and wd != "in":
            return self._real[real_name](src, dst, **kw)
        if ws != "in" or wd != "in" or kw:
            raise AssertionError(f"the recorder models renames inside one folder: {src} -> {dst}")
        with self._lock:
            self._real[real_name](src, dst)
            ino = self._names.pop(src_name)
            self._names[dst_name] = ino
            self._add(Op("rename", name=src_name, dst=dst_name, ino=ino))

    def _replace(self, src, dst, **kw):
        return self._rename_like("replace", src, dst, **kw)

    def _rename(self, src, dst, **kw):
        return self._rename_like("rename", src, dst, **kw)

    def _unlink_like(self, real_name: str, path, **kw):
        where, name = self._where(path)
        if where != "in" or kw:
            return self._real[real_name](path, **kw)
        with self._lock:
            self._real[real_name](path)
            ino = self._names.pop(name)
            self._add(Op("unlink", name=name, ino=ino))

    def _unlink(self, path, **kw):
        return self._unlink_like("unlink", path, **kw)

    def _remove(self, path, **kw):
        return self._unlink_like("remove", path, **kw)

    def _link(self, src, dst, **kw):
        (ws, src_name), (wd, dst_name) = self._where(src), self._where(dst)
        if ws != "in" and wd != "in":
            return self._real["link"](src, dst, **kw)
        if ws != "in" or wd != "in" or kw:
            raise AssertionError(f"the recorder models links inside one folder: {src} -> {dst}")
        with self._lock:
            self._real["link"](src, dst)
            ino = self._names[src_name]
            self._names[dst_name] = ino
            self._add(Op("link", name=dst_name, ino=ino, dst=src_name))

    def _mkdir(self, path, mode=0o777, **kw):
        where, name = self._where(path)
        self._real["mkdir"](path, mode, **kw)
        if where == "in":
            with self._lock:
                self._add(Op("mkdir", name=name))


# ---- building crash states ------------------------------------------------------------------
@dataclass(frozen=True)
class CrashState:
    files: tuple[tuple[str, bytes], ...]  # name -> content, sorted by name
    model: str  # "ordered" | "reorder"
    point: int  # operations before the crash
    returned: dict | None  # label of the last mark (a save that returned) before the crash
    lost: tuple[int, ...] = ()  # indices of directory operations lost
    data: str = "written"  # unsynced data: written | lost | zeroed

    def key(self) -> tuple:
        """Equal files and equal expectations: one check is enough."""
        return (tuple((n, xxhash.xxh3_64_hexdigest(c)) for n, c in self.files), repr(self.returned))


def crash_points(ops: list[Op]) -> list[int]:
    return [k for k in range(len(ops) + 1) if k == len(ops) or ops[k].kind not in ("write", "mark")]


def _subsets(pending: list[int]) -> Iterator[tuple[int, ...]]:
    m = len(pending)
    if m <= ENUMERATE_UP_TO:
        for r in range(m + 1):
            yield from itertools.combinations(pending, r)
        return
    yield ()
    yield tuple(pending)
    for p in pending:
        yield (p,)
        yield tuple(q for q in pending if q != p)
    yield from itertools.combinations(pending, 2)


class _Replay:
    """Walks the operations once; at each crash point gives file contents by inode."""

    def __init__(self, rec: Recording):
        self.rec = rec
        self.content: dict[int, bytearray] = {}
        self.synced: dict[int, bytes] = {}
        self.initial_names = dict(rec.initial_inos)
        for name, ino in self.initial_names.items():
            self.content[ino] = bytearray(rec.initial[name])
            self.synced[ino] = rec.initial[name]

    def step(self, op: Op) -> None:
        if op.kind == "create":
            self.content[op.ino] = bytearray()
        elif op.kind == "write":
            c = self.content[op.ino]
            if len(c) < op.offset:
                c.extend(bytes(op.offset - len(c)))
            c[op.offset : op.offset + len(op.data)] = op.data
        elif op.kind == "truncate":
            c = self.content[op.ino]
            del c[op.offset :]
            c.extend(bytes(op.offset - len(c)))
        elif op.kind == "fsync":
            self.synced[op.ino] = bytes(self.content[op.ino])

    def names(self, ops: list[Op], k: int, lost: set[int]) -> dict[str, int]:
        names = dict(self.initial_names)
        for i in range(k):
            op = ops[i]
            if op.kind not in DIR_OPS or i in lost:
                continue
            ino = op.ino
            if op.kind in ("create", "link"):
                names[op.name] = ino
            elif op.kind == "rename":
                if names.get(op.name) == ino:
                    del names[op.name]
                names[op.dst] = ino
            elif op.kind == "unlink" and names.get(op.name) == ino:
                del names[op.name]
        return names

    def data(self, ino: int, variant: str) -> bytes:
        current = bytes(self.content.get(ino, b""))
        synced = self.synced.get(ino, b"")
        if current == synced or variant == "written":
            return current
        if variant == "lost":
            return synced
        return synced[: len(current)] + bytes(max(0, len(current) - len(synced)))  # zeroed


def crash_states(rec: Recording, models: tuple[str, ...] = ("ordered", "reorder")) -> Iterator[CrashState]:
    """Every distinct crash state of the recording under the given models (see module doc)."""
    ops = rec.ops
    seen: set[tuple] = set()
    replay = _Replay(rec)
    points = set(crash_points(ops))
    returned = rec.initial_label
    last_fsync_dir = -1
    for k in range(len(ops) + 1):
        if k in points:
            unsynced = any(bytes(c) != replay.synced.get(i, b"") for i, c in replay.content.items())
            variants = ("written", "lost", "zeroed") if unsynced else ("written",)
            for model in models:
                if model == "ordered":
                    lost_sets: list[tuple[int, ...]] = [()]
                    model_variants = variants[:2]
                else:
                    pending = [i for i in range(last_fsync_dir + 1, k) if ops[i].kind in DIR_OPS]
                    lost_sets = list(_subsets(pending))
                    model_variants = variants
                for lost in lost_sets:
                    names = replay.names(ops, k, set(lost))
                    for variant in model_variants:
                        files = tuple(sorted((n, replay.data(ino, variant)) for n, ino in names.items()))
                        state = CrashState(files, model, k, returned, lost, variant)
                        key = state.key()
                        if key in seen:
                            continue
                        seen.add(key)
                        yield state
        if k == len(ops):
            break
        op = ops[k]
        replay.step(op)
        if op.kind == "fsync_dir":
            last_fsync_dir = k
        elif op.kind == "mark":
            returned = op.label
