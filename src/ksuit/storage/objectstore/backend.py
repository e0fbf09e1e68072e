"""`ObjectStoreBackend`: one checkpoint folder of an object store, seen through its head (the
protocol is in `ksuit.storage.objectstore`).

Readers get the layout's logical names: the committed sets of the head (their manifests and
files) plus the standalone objects stored under their own names. A committed sharded checkpoint
folder is listed among the folders, and `child(name)` is a read-only `CommittedFolder` over its
part objects (resolved through the head when `child` is called). The head is read again for
every call (a conditional GET: unchanged heads cost a `304`), except inside `lock()`, where one
head serves the whole block. Commit records never change once written, so they are cached.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ksuit.layout import is_part_filename, is_plain_filename, is_sharded_filename, parse_manifest_filename
from ksuit.storage.backend import (
    Backend,
    Entry,
    OpenedFile,
    RecoveryReport,
    SetTransaction,
    StagedFolder,
    WriteFn,
    WrittenFile,
)
from ksuit.storage.errors import CorruptCheckpointError, UnsafeCheckpointError
from ksuit.storage.objectstore.files import BytesFile, ObjectFile
from ksuit.storage.objectstore.records import (
    HEAD_KEY,
    MAX_RECORD_BYTES,
    PRIVATE,
    CommitRecord,
    Head,
    ObjectRef,
    commit_key,
    data_key,
    is_folder_key,
    part_key,
)
from ksuit.storage.objectstore.retry import RetryPolicy
from ksuit.storage.objectstore.stores import FsspecStore, Listed, Store, TooLarge, write_object

logger = logging.getLogger(__name__)

DEFAULT_READER_GRACE = 300.0  # seconds a replaced object stays readable
DEFAULT_RECOVERY_GRACE = 3600.0  # uncommitted objects younger than this are left to their save
KSUIT_OPTIONS = {
    "ksuit_part_size": "part_size",
    "ksuit_concurrency": "concurrency",
    "ksuit_retry_seconds": "retry_seconds",
    "ksuit_reader_grace": "reader_grace",
    "ksuit_recovery_grace": "recovery_grace",
}


@dataclass(frozen=True)
class HeadState:
    """The head as read (None: nothing committed yet), its ETag and the store's clock then."""

    head: Head | None
    etag: str | None
    server_time: float


@dataclass
class View:
    """What readers see: every committed set's manifest and every committed file's object."""

    state: HeadState
    manifests: dict[str, bytes]
    files: dict[str, ObjectRef]


class _Process:
    """This process as a writer: one owner token per process (a fork gets its own), and the
    folders it has committed to (where another writer's commit means it was replaced)."""

    def __init__(self) -> None:
        self.pid = -1
        self.token = ""
        self.committed: set[tuple[str, str]] = set()  # (folder, owner)
        self.lock = threading.Lock()
        self.folder_locks: dict[str, threading.RLock] = collections.defaultdict(threading.RLock)

    def current(self) -> _Process:
        with self.lock:
            if self.pid != os.getpid():
                self.pid = os.getpid()
                self.token = f"{socket.gethostname()[:60]} pid {self.pid} ({secrets.token_hex(4)})"
                self.committed = set()
                self.folder_locks = collections.defaultdict(threading.RLock)
        return self


PROCESS = _Process()
_HEADS: dict[str, tuple[Head, str]] = {}  # folder URL -> (head, etag): revalidated on every read
_RECORDS: collections.OrderedDict[str, CommitRecord] = collections.OrderedDict()
_CACHE_LOCK = threading.Lock()
MAX_CACHED_RECORDS = 4096


class ObjectStoreBackend(Backend):
    """A folder of an object store (see `ksuit.storage.objectstore`)."""

    def __init__(
        self,
        store: Store,
        root: str,
        *,
        reader_grace: float = DEFAULT_READER_GRACE,
        recovery_grace: float = DEFAULT_RECOVERY_GRACE,
        owner: str | None = None,
    ):
        self.store = store
        self.root = root.rstrip("/") or "/"
        self.location = store.url(self.root)
        self.reader_grace = float(reader_grace)
        self.recovery_grace = float(recovery_grace)
        self._owner = owner  # tests impersonate a second process with it
        self._pins = threading.local()
        self._recovered = False

    def __repr__(self) -> str:
        return f"ObjectStoreBackend({self.location!r})"

    @property
    def owner(self) -> str:
        """Who this writer is, in the head and in errors: host, pid and a random tag."""
        return self._owner or PROCESS.current().token

    @property
    def committed_here(self) -> bool:
        """Whether this writer (this process, or the owner a test gave) committed to the folder."""
        return (self.location, self.owner) in PROCESS.current().committed

    def mark_committed(self) -> None:
        PROCESS.current().committed.add((self.location, self.owner))

    def folder_lock(self) -> threading.RLock:
        """The lock that serializes this process's writes to the folder."""
        return PROCESS.current().folder_locks[self.location]

    # ---- names --------------------------------------------------------------------------------
    def path(self, relative: str) -> str:
        return f"{self.root.rstrip('/')}/{relative}"

    def _name(self, name: str) -> str:
        if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0"):
            raise ValueError(f"{name!r} is not a plain file name inside {self.location}")
        return name

    def file_location(self, name: str) -> str:
        return f"{self.location.rstrip('/')}/{name}"

    # ---- navigation -------------------------------------------------------------------------
    def child(self, name: str) -> ObjectStoreBackend:
        """The subfolder `name`; a committed sharded checkpoint folder: its part objects, as the
        head names them now (they stay readable for `reader_grace` after a newer save)."""
        if is_sharded_filename(self._name(name)):
            ref = self.view().files.get(name)
            if ref is not None and is_folder_key(ref.key):
                return CommittedFolder(self, name, ref)
        return ObjectStoreBackend(
            self.store,
            self.path(self._name(name)),
            reader_grace=self.reader_grace,
            recovery_grace=self.recovery_grace,
            owner=self._owner,
        )

    def _listing(self) -> tuple[list[Listed], list[str]]:
        """The objects and subfolders of the folder (one listing for a whole `lock()` block)."""
        pinned = getattr(self._pins, "listing", None)
        if pinned is not None:
            return pinned  # type: ignore[no-any-return]
        listing = self.store.list_folder(self.root)
        if getattr(self._pins, "state", None) is not None:
            self._pins.listing = listing
        return listing

    def exists_as(self) -> Literal["folder", "file", "missing"]:
        files, folders = self._listing()
        if files or folders:
            return "folder"
        return "file" if self.store.size(self.root) is not None else "missing"

    def folders(self) -> list[str]:
        """The subfolders: prefixes of the store, and the committed sharded checkpoint folders."""
        committed = {n for n, r in self.view().files.items() if is_folder_key(r.key)}
        return sorted({f for f in self._listing()[1] if not f.startswith(".")} | committed)

    def ensure_folder(self) -> None:
        """Object stores have no folders: a folder exists once an object is in it."""

    # ---- the head and the records -------------------------------------------------------------
    def read_head(self, fresh: bool = False) -> HeadState:
        """The head (revalidated), or the one pinned by `lock()` unless `fresh`."""
        pinned = getattr(self._pins, "state", None)
        if pinned is not None and not fresh:
            return pinned  # type: ignore[no-any-return]
        with _CACHE_LOCK:
            cached = _HEADS.get(self.location)
        try:
            fetched = self.store.get(
                self.path(HEAD_KEY), MAX_RECORD_BYTES, if_none_match=cached[1] if cached else None
            )
        except TooLarge as e:
            raise self._too_large(HEAD_KEY, e.size, MAX_RECORD_BYTES, "head") from None
        if fetched.not_modified and cached is not None:
            return HeadState(cached[0], cached[1], fetched.server_time)
        if fetched.data is None:
            with _CACHE_LOCK:
                _HEADS.pop(self.location, None)
            return HeadState(None, None, fetched.server_time)
        head = Head.from_json(fetched.data, source=self.file_location(HEAD_KEY))
        if fetched.etag is not None:
            with _CACHE_LOCK:
                _HEADS[self.location] = (head, fetched.etag)
        return HeadState(head, fetched.etag, fetched.server_time)

    def remember(self, record: CommitRecord) -> None:
        with _CACHE_LOCK:
            _RECORDS[self._record_url(record.save)] = record
            while len(_RECORDS) > MAX_CACHED_RECORDS:
                _RECORDS.popitem(last=False)

    def _record_url(self, save: str) -> str:
        return self.file_location(commit_key(save))

    def records(self, saves: set[str]) -> dict[str, CommitRecord]:
        """The commit records of `saves` (cached: a record never changes)."""
        found: dict[str, CommitRecord] = {}
        with _CACHE_LOCK:
            for save in saves:
                record = _RECORDS.get(self._record_url(save))
                if record is not None:
                    found[save] = record
        missing = sorted(saves - set(found))
        if missing:
            try:
                fetched = self.store.get_many([self.path(commit_key(s)) for s in missing], MAX_RECORD_BYTES)
            except TooLarge as e:
                where = e.path[len(self.path("")) :]
                raise self._too_large(where, e.size, MAX_RECORD_BYTES, "commit record") from None
            for save in missing:
                raw = fetched[self.path(commit_key(save))]
                source = self._record_url(save)
                if raw is None:
                    raise CorruptCheckpointError(
                        f"the head of {self.location} names the save {save}, but its commit record "
                        f"{source} is missing (deleted by hand?); the sets of that save cannot be read: "
                        "restore it from a versioned bucket or a backup"
                    )
                record = CommitRecord.from_json(raw, source)
                if record.save != save:
                    raise CorruptCheckpointError(
                        f"{source} is the record of save {record.save}, not of {save}"
                    )
                found[save] = record
                self.remember(record)
        return found

    def view(self, state: HeadState | None = None) -> View:
        state = state or self.read_head()
        manifests: dict[str, bytes] = {}
        files: dict[str, ObjectRef] = {}
        head = state.head
        if head is None:
            return View(state, manifests, files)
        records = self.records(head.saves())
        for manifest, save in sorted(head.sets.items()):
            set_record = records[save].sets.get(manifest)
            if set_record is None:
                raise CorruptCheckpointError(
                    f"the head of {self.location} says {manifest} is in save {save}, whose commit record "
                    "does not hold it; the folder was altered by hand: restore it from a backup"
                )
            manifests[manifest] = set_record.manifest.encode()
            for name, ref in set_record.objects.items():
                files.setdefault(name, ref)
        for name, save in sorted(head.loose.items()):
            loose = records[save].loose.get(name)
            if loose is not None:
                files.setdefault(name, loose)
        return View(state, manifests, files)

    # ---- reading ----------------------------------------------------------------------------
    def entries(self) -> list[Entry]:
        view = self.view()
        found = {n: Entry(n, len(data)) for n, data in view.manifests.items()}
        # names sharing one object (a progress tag and latest written from the same tensors) hold
        # its bytes once: the object's key is their file id
        found.update({n: Entry(n, r.size, file_id=r.key) for n, r in view.files.items() if n not in found})
        folders = {n for n, r in view.files.items() if is_folder_key(r.key)}  # listed by `folders`
        for listed in self._listing()[0]:
            name = listed.path.rsplit("/", 1)[-1]
            if name not in found:  # a standalone object (a committed set's name takes precedence)
                found[name] = Entry(name, listed.size)
        return sorted((e for e in found.values() if e.name not in folders), key=lambda e: e.name)

    def read_small(self, name: str, max_bytes: int, what: str) -> bytes:
        self._name(name)
        view = self.view()
        if name in view.manifests:
            data = view.manifests[name]
            if len(data) > max_bytes:
                raise self._too_large(name, len(data), max_bytes, what)
            return data
        ref = view.files.get(name)
        if ref is not None and is_folder_key(ref.key):
            raise self._folder(name)
        path = self.path(ref.key) if ref is not None else self.path(name)
        try:
            fetched = self.store.get(path, max_bytes)
        except TooLarge as e:
            raise self._too_large(name, e.size, max_bytes, what) from None
        if fetched.data is None:
            raise self._missing(name)
        return fetched.data

    def _too_large(self, name: str, size: int, max_bytes: int, what: str) -> UnsafeCheckpointError:
        return UnsafeCheckpointError(
            f"refusing to read {self.file_location(name)}: it is {size} bytes or more, more than the "
            f"{max_bytes} bytes a {what} may have; it is not a file ksuit wrote: delete it or restore it "
            "from a backup"
        )

    def _folder(self, name: str) -> UnsafeCheckpointError:
        return UnsafeCheckpointError(
            f"{self.file_location(name)} is a sharded checkpoint folder, not a file; read its parts "
            "(ksuit.load_model and `ksuit export` take the folder)"
        )

    def _missing(self, name: str) -> FileNotFoundError:
        where = self.file_location(name)
        return FileNotFoundError(errno.ENOENT, f"checkpoint file {where} does not exist", where)

    def open(self, name: str, follow_symlinks: bool = False) -> OpenedFile:
        self._name(name)
        view = self.view()
        if name in view.manifests:
            return BytesFile(view.manifests[name], name, self.file_location(name))
        ref = view.files.get(name)
        if ref is not None and is_folder_key(ref.key):
            raise self._folder(name)
        if ref is not None:
            where = self.file_location(name)
            return ObjectFile(self.store, self.path(ref.key), name, where, ref.size, immutable=True)
        size = self.store.size(self.path(name))
        if size is None:
            raise self._missing(name)
        return ObjectFile(self.store, self.path(name), name, self.file_location(name), size)

    def checksum(self, name: str) -> tuple[int, str] | None:
        try:
            with self.open(name) as f:
                return f.checksum()
        except (FileNotFoundError, UnsafeCheckpointError):
            return None

    # ---- writing ----------------------------------------------------------------------------
    def begin_set(
        self, manifest_of: Mapping[str, str | None], needed_bytes: int
    ) -> contextlib.AbstractContextManager[SetTransaction]:
        from ksuit.storage.objectstore.commit import begin_set

        for name in manifest_of:
            if not is_plain_filename(name):
                raise ValueError(f"{name!r} is not a plain file name inside {self.location}")
        return begin_set(self, dict(manifest_of))

    def write_file(self, name: str, write: WriteFn, expected_nbytes: int = 0) -> WrittenFile:
        self._name(name)
        stream, seconds = write_object(self.store, self.path(name), write, expected_nbytes)
        return WrittenFile(self.file_location(name), name, stream.nbytes, stream.hexdigest(), seconds)

    def write_part(
        self, staged: StagedFolder, part: str, write: WriteFn, expected_nbytes: int = 0
    ) -> WrittenFile:
        """Writes the part `part` of a sharded checkpoint folder staged by a save of this folder
        (in any process) below its folder key, hashed while it streams; the object exists whole
        when this returns. The staged folder's key must be a folder key of this folder's grammar
        (`.ksuit/data/<save id>/<its name>`), so a part can land nowhere else; an existing part
        is never replaced."""
        key = staged.key if isinstance(staged, StagedFolder) and isinstance(staged.key, str) else ""
        name = staged.name if isinstance(staged, StagedFolder) else None
        if not is_folder_key(key) or not isinstance(name, str) or key != data_key(key.split("/")[2], name):
            raise ValueError(f"{staged!r} is not a staged sharded checkpoint folder of {self.location}")
        if not is_part_filename(part):
            raise ValueError(f"{part!r} is not a part name of a sharded checkpoint folder")
        path = self.path(part_key(key, part))
        if self.store.size(path) is not None:
            raise FileExistsError(
                errno.EEXIST,
                f"{self.store.url(path)} already exists: a part is written once, by one process",
                self.store.url(path),
            )
        stream, seconds = write_object(self.store, path, write, expected_nbytes)
        return WrittenFile(self.store.url(path), part, stream.nbytes, stream.hexdigest(), seconds)

    def delete(self, names: Sequence[str]) -> None:
        """Deletes standalone objects; a manifest's name deletes its set (`delete_set`); a file of
        a committed set is only deleted with its set."""
        names = [self._name(n) for n in names]
        view = self.view(self.read_head(fresh=True))
        for name in names:
            if name in view.manifests:
                self.delete_set(name)
        members = sorted(n for n in names if n in view.files and n not in view.manifests)
        if members:
            raise ValueError(
                f"{', '.join(members)} belong to committed checkpoint sets of {self.location}; delete "
                "a set as a whole (delete_set, or its manifest's name)"
            )
        plain = [self.path(n) for n in names if n not in view.manifests]
        self.store.delete(plain)

    def delete_set(self, manifest: str, files: Sequence[str] | None = None) -> None:
        """Deletes the set of `manifest` crash-safely: one head swap hides it (its commit record
        may hold other sets of the same save, so the head, not the record, is what goes first),
        then its objects are retired and removed once no reader can still be using them (or by
        recovery after a crash). The set's objects come from its commit record; `files`, the
        names the caller knows, are only checked."""
        from ksuit.storage.objectstore.commit import hide_sets

        if parse_manifest_filename(self._name(manifest)) is None:
            raise ValueError(f"{manifest!r} is not a manifest name")
        for name in files or ():
            self._name(name)
        hide_sets(self, [manifest])

    # ---- housekeeping ----------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[object]:
        """Holds this process's writers to the folder off, and pins one head for every read of
        this thread inside the block (a consistent view; other processes are not held off: their
        commits are new heads, and the pinned head's objects stay readable for `reader_grace`)."""
        with self.folder_lock():
            outer = getattr(self._pins, "state", None)
            if outer is None:
                self._pins.state = self.read_head(fresh=True)
            try:
                yield self
            finally:
                if outer is None:
                    self._pins.state = self._pins.listing = None

    def follow(self, state: HeadState) -> None:
        """After this thread swapped the head: a `lock()` block sees its own writes."""
        if getattr(self._pins, "state", None) is not None:
            self._pins.state = state

    def recover(self) -> RecoveryReport:
        return self.repair(self.recovery_grace)

    def repair(self, grace_seconds: float | None = None) -> RecoveryReport:
        """Removes what no committed set references and no save younger than `grace_seconds` may
        still be writing (see the protocol, step 5)."""
        from ksuit.storage.objectstore.collect import collect

        grace = self.recovery_grace if grace_seconds is None else float(grace_seconds)
        if grace < 0:
            raise ValueError(f"the grace period must be >= 0 seconds, got {grace}")
        with self.folder_lock():
            pinned = getattr(self._pins, "state", None), getattr(self._pins, "listing", None)
            self._pins.state = self._pins.listing = None
            try:
                report = collect(self, grace)
            finally:
                self._pins.state, self._pins.listing = pinned
        self._recovered = True
        return report

    def recover_once(self) -> None:
        """Recovery before this backend's first save (like the local backend's)."""
        if not self._recovered:
            self.recover()

    def free_bytes(self) -> int | None:
        return None

    def private_prefix(self) -> str:
        return self.path(PRIVATE)


class CommittedFolder(ObjectStoreBackend):
    """A committed sharded checkpoint folder of `parent`, read-only: its entries are the part
    objects below its folder key (what is really there, so `ksuit verify` and loads compare the
    parts with the manifest), opened as immutable objects; messages name it by its logical
    location (`<parent>/<name>`)."""

    def __init__(self, parent: ObjectStoreBackend, name: str, ref: ObjectRef):
        super().__init__(
            parent.store,
            parent.path(ref.key),
            reader_grace=parent.reader_grace,
            recovery_grace=parent.recovery_grace,
            owner=parent._owner,
        )
        self.location = parent.file_location(name)
        self.parent = parent

    def __repr__(self) -> str:
        return f"CommittedFolder({self.location!r})"

    def read_head(self, fresh: bool = False) -> HeadState:
        return HeadState(None, None, time.time())  # no head of its own: only objects

    def child(self, name: str) -> ObjectStoreBackend:
        where = self.file_location(self._name(name))
        raise NotADirectoryError(f"{where}: a sharded checkpoint folder has no subfolders")

    def open(self, name: str, follow_symlinks: bool = False) -> OpenedFile:
        self._name(name)
        size = self.store.size(self.path(name))
        if size is None:
            raise self._missing(name)
        return ObjectFile(self.store, self.path(name), name, self.file_location(name), size, immutable=True)

    def _read_only(self, *args: Any, **kwargs: Any) -> Any:
        raise PermissionError(
            f"{self.location} is a committed sharded checkpoint folder: it is never written into "
            "(a newer save writes a new one)"
        )

    begin_set = write_file = write_part = delete = delete_set = _read_only

    def recover(self) -> RecoveryReport:
        return RecoveryReport()  # its parent's recovery covers it

    def repair(self, grace_seconds: float | None = None) -> RecoveryReport:
        return RecoveryReport()


# ---- opening ----------------------------------------------------------------------------------


def open_object_backend(url: str, storage_options: Mapping[str, Any] | None = None) -> ObjectStoreBackend:
    """The backend of the folder at an fsspec URL (`s3://bucket/prefix`, `memory://runs`, ...).

    `storage_options` go to the file system (s3fs: `key`, `secret`, `endpoint_url`, `profile`,
    `client_kwargs`, `config_kwargs`, ...), except the `ksuit_*` ones: `ksuit_part_size`,
    `ksuit_concurrency` (multipart streaming), `ksuit_retry_seconds` (the retry budget of one
    request), `ksuit_reader_grace`, `ksuit_recovery_grace` (seconds; see the protocol).
    """
    options = dict(storage_options or {})
    ours = {KSUIT_OPTIONS[k]: options.pop(k) for k in list(options) if k in KSUIT_OPTIONS}
    unknown = [k for k in options if k.startswith("ksuit_")]
    if unknown:
        known = ", ".join(KSUIT_OPTIONS)
        raise ValueError(f"unknown storage options {', '.join(unknown)}; the ksuit ones are {known}")
    scheme = url.split("://", 1)[0].lower()
    reader_grace = float(ours.get("reader_grace", DEFAULT_READER_GRACE))
    recovery_grace = float(ours.get("recovery_grace", DEFAULT_RECOVERY_GRACE))
    if scheme in ("s3", "s3a"):
        store, root = _s3_store(url, options, ours)
    else:
        import fsspec

        try:
            fs, root = fsspec.core.url_to_fs(url, **options)
        except ImportError as e:
            raise ImportError(f"{scheme}:// locations need an fsspec implementation: {e}") from None
        except ValueError as e:
            raise ValueError(f"no storage backend for {scheme}:// locations ({url}): {e}") from None
        store = FsspecStore(fs, scheme)
    return ObjectStoreBackend(store, root, reader_grace=reader_grace, recovery_grace=recovery_grace)


def _s3_store(url: str, options: dict[str, Any], ours: dict[str, Any]) -> tuple[Store, str]:
    try:
        import s3fs  # noqa: F401
    except ImportError:
        raise ImportError(
            f"{url}: s3:// locations need s3fs, which is not installed: pip install 'ksuit[s3]'"
        ) from None
    import fsspec

    from ksuit.storage.objectstore.s3 import S3Store

    # ksuit retries (bounded, see RetryPolicy); botocore's own retries stay off unless configured
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("retries", {"total_max_attempts": 1})
    config.setdefault("connect_timeout", 10)
    config.setdefault("read_timeout", 60)
    options["config_kwargs"] = config
    fs, root = fsspec.core.url_to_fs(url, **options)
    policy = RetryPolicy(max_seconds=float(ours["retry_seconds"])) if "retry_seconds" in ours else None
    store = S3Store(
        fs,
        policy,
        part_size=int(ours.get("part_size", 16 << 20)),
        concurrency=int(ours.get("concurrency", 4)),
    )
    if not root.strip("/"):
        raise ValueError(f"{url} names no bucket; use s3://<bucket>/<prefix>")
    return store, root
