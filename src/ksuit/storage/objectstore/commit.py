"""Writing a set to an object store: stage, commit record, head swap, retire (steps 1-4 of the
protocol in `ksuit.storage.objectstore`); and hiding sets (retention's deletes).

A sharded checkpoint folder is staged under a folder key of the save
(`.ksuit/data/<save id>/<folder name>`): every rank writes its parts below it
(`ObjectStoreBackend.write_part`), the coordinator checks the listing holds exactly the parts
the ranks reported (`add_folder`) and the commit record names the folder key like any file's
object. Wherever keys are deleted, a folder key stands for every part object below it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from ksuit.layout import is_part_filename, is_sharded_filename
from ksuit.storage.backend import SetTransaction, StagedFolder, WriteFn, WrittenFile, folder_digest
from ksuit.storage.errors import ConcurrentWriterError
from ksuit.storage.manifest import Manifest
from ksuit.storage.objectstore.records import (
    HEAD_KEY,
    CommitRecord,
    Head,
    ObjectRef,
    SetRecord,
    commit_key,
    data_key,
    folder_of,
    is_folder_key,
    new_save_id,
    save_time,
)
from ksuit.storage.objectstore.stores import PreconditionFailed, write_object
from ksuit.storage.objectstore.streams import UploadStream

if TYPE_CHECKING:
    from ksuit.storage.objectstore.backend import HeadState, ObjectStoreBackend

logger = logging.getLogger(__name__)
MAX_SWAPS = 50


def live_keys(backend: ObjectStoreBackend, head: Head) -> set[str]:
    """Every key the head's sets and standalone files use: their objects and the commit records
    that hold them."""
    records = backend.records(head.saves())
    keys = {commit_key(s) for s in head.saves()}
    for manifest, save in head.sets.items():
        set_record = records[save].sets.get(manifest)
        if set_record is not None:
            keys |= {r.key for r in set_record.objects.values()}
    for name, save in head.loose.items():
        ref = records[save].loose.get(name)
        if ref is not None:
            keys.add(ref.key)
    return keys


def referenced(backend: ObjectStoreBackend, head: Head) -> set[str]:
    """Every key the head keeps: the live ones and those it retired (until a reader grace)."""
    return live_keys(backend, head) | set(head.retired)


def retire(
    backend: ObjectStoreBackend, before: Head | None, after: Head, now: float
) -> tuple[Head, list[str]]:
    """`after` with the keys `before` kept alive and `after` no longer does listed as retired at
    `now`, and without the retired keys whose reader grace has passed (returned: to delete)."""
    old = live_keys(backend, before) if before is not None else set()
    alive = live_keys(backend, after)
    for key in old - alive - set(after.retired):
        after.retired[key] = int(now)
    expired = sorted(
        k for k, t in after.retired.items() if t + backend.reader_grace <= now and k not in alive
    )
    for key in expired:
        del after.retired[key]
    return after, expired


def folder_parts(backend: ObjectStoreBackend, folder_key: str) -> list[str]:
    """The keys of the part objects below the folder key `folder_key` (only keys of the part
    grammar: nothing else is ever deleted with a folder)."""
    root = backend.path("")
    objects, _ = backend.store.list_folder(backend.path(folder_key), recursive=True)
    return [k for o in objects if folder_of(k := o.path[len(root) :]) == folder_key]


def expand_folders(backend: ObjectStoreBackend, keys: Sequence[str]) -> list[str]:
    """`keys` with every folder key replaced by the part objects below it."""
    result: list[str] = []
    for key in keys:
        result += folder_parts(backend, key) if is_folder_key(key) else [key]
    return result


def delete_quietly(backend: ObjectStoreBackend, keys: Sequence[str]) -> None:
    """Deletes objects no head references (a folder key: its parts); a failure only leaves them
    to recovery."""
    if not keys:
        return
    try:
        backend.store.delete([backend.path(k) for k in expand_folders(backend, keys)])
    except Exception as e:
        logger.warning(
            "could not delete %d unreferenced objects of %s (recovery will): %s",
            len(keys),
            backend.location,
            e,
        )


def swap_head(
    backend: ObjectStoreBackend,
    base: HeadState,
    change: Callable[[HeadState], Head],
    token: str,
    check: Callable[[HeadState], None],
) -> tuple[HeadState, Head, list[str]]:
    """Replaces the head by `change(current)` with compare-and-swap, re-reading and calling
    `check` (which raises to give up) whenever another process changed it first. Returns the
    state swapped from, the new head and the expired keys to delete. A write whose answer was
    lost is recognised by its `token` in the head."""
    state = base
    for _ in range(MAX_SWAPS):
        new = change(state)
        new.write = token
        new, expired = retire(backend, state.head, new, state.server_time)
        try:
            stored = backend.store.put(
                backend.path(HEAD_KEY),
                new.to_json(),
                create_only=state.head is None,
                if_match=state.etag if state.head is not None else None,
            )
        except PreconditionFailed:
            current = backend.read_head(fresh=True)
            if current.head is not None and current.head.write == token:
                return state, current.head, []  # our write landed; its answer was lost
            check(current)
            state = current
            continue
        from ksuit.storage.objectstore.backend import _CACHE_LOCK, _HEADS, HeadState

        with _CACHE_LOCK:
            _HEADS[backend.location] = (new, stored.etag)
        backend.follow(HeadState(new, stored.etag, stored.server_time))
        return state, new, expired
    raise ConcurrentWriterError(
        f"the head of {backend.location} changed {MAX_SWAPS} times while this process tried to update it; "
        "another process is writing to this folder: stop it, then save again"
    )


class ObjectSetTransaction(SetTransaction):
    """One save into an object-store folder."""

    def __init__(self, backend: ObjectStoreBackend, manifest_of: dict[str, str | None], begin: HeadState):
        self.backend = backend
        self.manifest_of = manifest_of
        self.begin = begin
        self.save = new_save_id(begin.server_time)
        self.owner_at_begin = begin.head.owner if begin.head is not None else None
        self.sequence_floor = (begin.head.sequence + 1) if begin.head is not None else 0
        self.staged: dict[str, ObjectRef] = {}
        self.folders: dict[str, str] = {}  # sharded folder name -> its folder key, once staged
        self.written: dict[str, WrittenFile] = {}
        self.committed = False
        self.in_doubt = False  # a head write was sent and its outcome is unknown: delete nothing
        self._open: UploadStream | None = None

    def stage(self, name: str, write: WriteFn, expected_nbytes: int) -> WrittenFile:
        key = data_key(self.save, name)
        self.staged[name] = ObjectRef(key, 0)  # removed on failure even if half written

        def opened(stream: UploadStream) -> None:
            self._open = stream

        path = self.backend.path(key)
        stream, seconds = write_object(self.backend.store, path, write, expected_nbytes, opened)
        self._open = None
        self.staged[name] = ObjectRef(key, stream.nbytes)
        written = WrittenFile(
            self.backend.file_location(name), name, stream.nbytes, stream.hexdigest(), seconds
        )
        self.written[name] = written
        return written

    def stage_same(self, name: str, same_as: str) -> WrittenFile | None:
        """`name` shares the object of `same_as` (staged by this save): no byte is written again,
        the commit record points both names at one object, and deleting one name's set keeps
        the object while the other's set uses it."""
        ref = self.staged.get(same_as)
        if ref is None or self.written.get(same_as) is None or is_folder_key(ref.key):
            return None
        self.staged[name] = ref
        first = self.written[same_as]
        shared = WrittenFile(self.backend.file_location(name), name, first.size, first.checksum, 0.0, same_as)
        self.written[name] = shared
        return shared

    def stage_folder(self, name: str) -> StagedFolder:
        """A folder key of this save for the sharded checkpoint folder `name`: new (the save id
        is), so no rank ever writes among the objects of a committed folder."""
        if not is_sharded_filename(name) or name not in self.manifest_of:
            raise ValueError(f"{name!r} is not a sharded checkpoint folder of this save")
        if name in self.folders:
            raise ValueError(f"{name!r} is already staged in this save")
        key = data_key(self.save, name)
        self.folders[name] = key  # removed on failure from here on
        objects, subfolders = self.backend.store.list_folder(self.backend.path(key))
        if objects or subfolders:
            raise FileExistsError(
                f"{self.backend.store.url(self.backend.path(key))} already holds objects: two saves drew "
                "the same id; save again"
            )
        return StagedFolder(name, key)

    def add_folder(self, staged: StagedFolder, parts: Sequence[WrittenFile]) -> WrittenFile:
        """Checks that the staged folder holds exactly the parts the ranks reported (names and
        sizes; each rank hashed its own parts while writing them) and stages it as one file."""
        key = self.folders.get(staged.name)
        if key is None or key != staged.key:
            raise ValueError(f"{staged.name!r} was not staged by this save")
        expected = {p.name: (p.size, p.checksum) for p in parts}
        if len(expected) != len(parts):
            raise ValueError(f"two processes wrote the same part of {staged.name}")
        objects, subfolders = self.backend.store.list_folder(self.backend.path(key))
        found = {o.path.rsplit("/", 1)[-1]: o.size for o in objects}
        sizes = {name: size for name, (size, _) in expected.items()}
        if found != sizes or subfolders or not all(is_part_filename(n) for n in found):
            where = self.backend.store.url(self.backend.path(key))
            raise RuntimeError(
                f"the staged folder {where} holds {sorted(found) + sorted(subfolders)} but the ranks wrote "
                f"{sorted(sizes)}; the save is abandoned (the previous checkpoint is intact)"
            )
        size, checksum = folder_digest(expected)
        self.staged[staged.name] = ObjectRef(key, size)
        written = WrittenFile(self.backend.file_location(staged.name), staged.name, size, checksum)
        self.written[staged.name] = written
        return written

    def commit(self, manifests: Sequence[tuple[str, bytes]], sequence: int) -> None:
        record = self._record(manifests, sequence)
        self._put_record(record)
        self.backend.remember(record)
        self.in_doubt = True
        change = functools.partial(self._apply, record)
        try:
            _, _, expired = swap_head(self.backend, self.begin, change, self.save, self._check)
        except ConcurrentWriterError:
            # refused after re-reading a head that does not name this save: it never will
            self.in_doubt = False
            raise
        self.committed = True
        self.in_doubt = False
        self.backend.mark_committed()
        delete_quietly(self.backend, expired)

    def _record(self, manifests: Sequence[tuple[str, bytes]], sequence: int) -> CommitRecord:
        begin = self.begin.head
        bases = self.backend.records(
            {begin.sets[m] for m, _ in manifests if begin is not None and m in begin.sets}
        )
        record = CommitRecord(self.save, sequence, self.backend.owner)
        named: set[str] = set()
        for manifest_name, data in manifests:
            manifest = Manifest.from_json(data, source=self.backend.file_location(manifest_name))
            record.run_id = manifest.run_id or record.run_id
            base_set = (
                bases[begin.sets[manifest_name]].sets.get(manifest_name)
                if begin is not None and manifest_name in begin.sets
                else None
            )
            objects: dict[str, ObjectRef] = {}
            for file_name, entry in manifest.files.items():
                ref = self.staged.get(file_name)
                if ref is None and base_set is not None:  # a file this save did not rewrite
                    ref = base_set.objects.get(file_name)
                if ref is not None and ref.size == entry.size:
                    objects[file_name] = ref
                named.add(file_name)
            record.sets[manifest_name] = SetRecord(data.decode(), objects)
        for name, ref in self.staged.items():
            if self.manifest_of.get(name) is None and name not in named:
                record.loose[name] = ref
        return record

    def _put_record(self, record: CommitRecord) -> None:
        data = record.to_json()
        path = self.backend.path(commit_key(record.save))
        try:
            self.backend.store.put(path, data, create_only=True)
        except PreconditionFailed:
            # a retry (ours, or the HTTP client's on a dropped connection) of a write that landed
            if self.backend.store.get(path, len(data) + 1).data != data:
                raise ConcurrentWriterError(
                    f"{self.backend.file_location(commit_key(record.save))} already exists: two saves drew "
                    "the same id; save again"
                ) from None

    def _apply(self, record: CommitRecord, state: HeadState) -> Head:
        head = state.head.copy() if state.head is not None else Head()
        head.sets.update(dict.fromkeys(record.sets, record.save))
        head.loose.update(dict.fromkeys(record.loose, record.save))
        head.sequence = max(head.sequence, record.sequence)
        head.owner = record.owner
        head.run_id = record.run_id or head.run_id
        return head

    def _check(self, current: HeadState) -> None:
        """Gives up the save when what changed the head conflicts with it."""
        head = current.head or Head()
        expected = self.backend.owner if self.backend.committed_here else self.owner_at_begin
        if head.owner is not None and head.owner not in (expected, self.backend.owner):
            raise replaced_error(self.backend, head)
        if head.collected_before >= save_time(self.save):
            raise ConcurrentWriterError(
                f"recovery of {self.backend.location} (`ksuit verify --repair`, or another process's "
                f"recovery) collected saves started before {time.ctime(head.collected_before)} while this "
                "save was being written; it is not committed (the previous sets stand): save again"
            )
        begin = self.begin.head or Head()
        changed = sorted(m for m in self.manifest_of.values() if m and head.sets.get(m) != begin.sets.get(m))
        if changed:
            raise ConcurrentWriterError(
                f"{', '.join(changed)} in {self.backend.location} changed while this save was being written "
                "(another process saved or deleted them); this save is not committed: save again"
            )

    def discard(self) -> None:
        """Removes what a save that did not commit staged (not when its commit is in doubt)."""
        if self._open is not None:
            self._open.abort()
            self._open = None
        if self.committed or self.in_doubt:
            return
        keys = {ref.key for ref in self.staged.values()} | set(self.folders.values())
        delete_quietly(self.backend, sorted(keys))


def replaced_error(backend: ObjectStoreBackend, head: Head) -> ConcurrentWriterError:
    run = f"run {head.run_id}" if head.run_id else "the run"
    return ConcurrentWriterError(
        f"another writer ({head.owner}) committed to {run} in {backend.location} after this one "
        f"({backend.owner}) did: two processes are saving the same run (a job still running after it was "
        "restarted?). This process stops saving there; its save is not committed and the other writer's "
        "checkpoints are left as they are"
    )


@contextlib.contextmanager
def begin_set(backend: ObjectStoreBackend, manifest_of: dict[str, str | None]) -> Iterator[SetTransaction]:
    """Step 1 of the protocol: read the head (a permanent error fails here, before anything is
    written), refuse to save when another writer replaced this one, then stage."""
    backend.recover_once()  # reads the head first: a permanent error fails before any write
    state = backend.read_head(fresh=True)
    if backend.committed_here and state.head is not None and state.head.owner != backend.owner:
        raise replaced_error(backend, state.head)
    txn = ObjectSetTransaction(backend, manifest_of, state)
    with backend.folder_lock():
        try:
            yield txn
        except BaseException as e:
            txn.discard()
            if txn.in_doubt:
                e.add_note(
                    f"the head of {backend.location} may or may not name this save: the next save, resume or "
                    "`ksuit verify` sees which; its objects are kept until then"
                )
            raise
        if not txn.committed:
            txn.discard()


def hide_sets(backend: ObjectStoreBackend, manifests: Sequence[str]) -> None:
    """Removes sets from the head with one swap (they are gone for every reader from then on),
    then deletes their objects once no reader can still be using them."""
    with backend.folder_lock():
        state = backend.read_head(fresh=True)
        if state.head is None or not any(m in state.head.sets for m in manifests):
            return

        def change(current: HeadState) -> Head:
            head = current.head.copy() if current.head is not None else Head()
            for m in manifests:
                head.sets.pop(m, None)
            return head

        token = f"delete {new_save_id(state.server_time)}"
        _, _, expired = swap_head(backend, state, change, token, lambda current: None)
        delete_quietly(backend, expired)
