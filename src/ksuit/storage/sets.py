"""Writing a set of checkpoint files through any backend: payloads become files in their
formats, each (group, tag) gets its updated manifest, and the backend commits them together.

`SetWriter` is the synchronous writer; `ksuit.storage.async_writer.AsyncSetWriter` wraps one to
write in the background. Both have the `SetSink` interface the checkpoint writer uses.

Bytes are written once per save: a file whose payload is the very object of an earlier file of
the same save (a progress tag's and `latest`'s optimizer state) is staged as the same bytes
(`SetTransaction.stage_same`: a hard link on local disk), unless the backend cannot.

`SaveHooks` (retention, `ksuit.retention`) run on the thread that writes: before a save is
staged, with the folder lock held, and after it committed or failed.

A set with sharded checkpoint folders (`fmt="dcp"`, `ksuit.storage.sharded`) is written by every
rank together and committed once by rank 0 (`SetWriter._write_sharded`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ksuit.layout import SHARDED_FORMAT, manifest_filename, parse_checkpoint_filename
from ksuit.storage.backend import (
    Backend,
    Location,
    SetTransaction,
    StagedFolder,
    WriteFn,
    WriteStream,
    WrittenFile,
)
from ksuit.storage.errors import CorruptCheckpointError
from ksuit.storage.formats import get_format
from ksuit.storage.locations import open_backend
from ksuit.storage.manifest import Manifest, ManifestEntry, read_manifest
from ksuit.utils import distributed

logger = logging.getLogger(__name__)


@dataclass
class PendingFile:
    """One file of a set: its final name, payload and format; `group`/`tag` choose its manifest
    (None: a standalone file with no manifest). `role` is what the file holds: model, optim or
    trainer."""

    filename: str
    payload: dict[str, Any]
    fmt: str = "torch"
    role: str | None = None
    group: str | None = None
    tag: str | None = None
    training_iteration: dict[str, int] | None = None
    metrics: dict[str, float] | None = None  # recorded in the manifest of its set
    # `file_nbytes`, taken once per save (walking a payload's tensors costs per file and call)
    estimated_nbytes: int | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def manifest(self) -> str | None:
        """The file name of the manifest of its set (None for a standalone file)."""
        return (
            manifest_filename(self.group, self.tag)
            if self.group is not None and self.tag is not None
            else None
        )

    def with_payload(self, payload: dict[str, Any]) -> PendingFile:
        return dataclasses.replace(self, payload=payload)


OnWritten = Callable[[list[WrittenFile]], None]


class SaveHooks(Protocol):
    """What runs around each save on the thread that writes it (a retention policy,
    `ksuit.retention.Retention`)."""

    def before_save(self, backend: Backend, files: list[PendingFile], needed_bytes: int) -> None:
        """Before anything of the save is written, with the folder lock held: may delete sets to
        make room for `needed_bytes`, or raise `OSError(ENOSPC)` so that nothing is written."""

    def after_save(
        self, backend: Backend, files: list[PendingFile], committed: Mapping[str, int] | None
    ) -> None:
        """After the save: `committed` maps each manifest it wrote whole (every file of the set
        written by this save) to its commit sequence; None when the save failed."""


class SetSink(Protocol):
    """What the checkpoint writer hands its sets to: `SetWriter` or `AsyncSetWriter`."""

    @property
    def backend(self) -> Backend: ...

    def write_set(
        self, files: list[PendingFile], run_id: str | None = None, on_written: OnWritten | None = None
    ) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


_SEQUENCE_LOCK = threading.Lock()
_LAST_SEQUENCE = 0


def next_sequence(at_least: int = 0) -> int:
    """A commit sequence larger than every one this process gave out and than `at_least`
    (clock steps back cannot make a newer save look older)."""
    global _LAST_SEQUENCE
    with _SEQUENCE_LOCK:
        _LAST_SEQUENCE = max(time.time_ns(), _LAST_SEQUENCE + 1, at_least)
        return _LAST_SEQUENCE


def file_nbytes(f: PendingFile) -> int:
    """Bytes one file will take (an estimate from its tensors; a sharded folder: every rank's),
    computed once per pending file."""
    if f.estimated_nbytes is None:
        if f.fmt == SHARDED_FORMAT:
            from ksuit.storage.formats import iter_tensors

            tensors = iter_tensors(f.payload)
            f.estimated_nbytes = sum(t.numel() * t.element_size() for t in tensors) + 64 * 1024
        else:
            f.estimated_nbytes = get_format(f.fmt).estimate_nbytes(f.payload)
    return f.estimated_nbytes


def estimate_nbytes(files: list[PendingFile]) -> int:
    """Bytes the files of a set will take (an estimate from their tensors); a payload that two
    files share is written once."""
    # each sharded folder is written on its own, even when its payload is another's
    unique = {(id(f.payload), f.fmt, f.filename if f.fmt == SHARDED_FORMAT else ""): f for f in files}
    return sum(file_nbytes(f) for f in unique.values())


class SetWriter:
    """Writes sets of files into one folder of a backend, each as one atomic commit; `hooks`
    run around every save (see `SaveHooks`).

    A set with sharded checkpoint folders (`fmt="dcp"`, `ksuit.storage.sharded`) is written by
    every rank of `group` (the default process group when None) together: each rank passes the
    same sharded files (its own shards in them), rank 0 of the group also the files only it
    writes, and rank 0 runs the hooks and commits the whole set once every rank's parts are
    durable (`_write_sharded`). Sets without sharded folders are written by the calling
    process alone.
    """

    def __init__(self, folder: Backend | Location, hooks: SaveHooks | None = None, group: Any = None):
        self._backend = open_backend(folder)
        self.hooks = hooks
        self.group = group  # a torch.distributed ProcessGroup for sharded sets (None: the default)

    @property
    def backend(self) -> Backend:
        return self._backend

    def write_set(
        self, files: list[PendingFile], run_id: str | None = None, on_written: OnWritten | None = None
    ) -> None:
        written = self.write(files, run_id)
        if on_written is not None:
            on_written(written)

    def write(self, files: list[PendingFile], run_id: str | None = None) -> list[WrittenFile]:
        """Writes `files` and the updated manifests of their sets as one commit; returns what
        was written (manifests not included)."""
        if not files:
            return []
        if any(f.fmt == SHARDED_FORMAT for f in files):
            return self._write_sharded(files, run_id)
        if self.hooks is None:
            return self._write(files, run_id)[0]
        committed: dict[str, int] | None = None
        try:
            self._backend.ensure_folder()
            with self._backend.lock():  # what the hook decides holds until the save committed
                self.hooks.before_save(self._backend, files, estimate_nbytes(files))
                written, committed = self._write(files, run_id)
        finally:
            self.hooks.after_save(self._backend, files, committed)
        return written

    def _write(
        self, files: list[PendingFile], run_id: str | None
    ) -> tuple[list[WrittenFile], dict[str, int]]:
        manifest_of: dict[str, str | None] = {f.filename: f.manifest for f in files}
        manifest_of.update({m: m for f in files if (m := f.manifest) is not None})
        with self._backend.begin_set(manifest_of, estimate_nbytes(files)) as txn:
            bases = self._base_manifests(files)
            # newer than the backend's own floor and every manifest this save replaces
            floor = max([txn.sequence_floor] + [(m.commit_sequence or 0) + 1 for m in bases.values()])
            sequence = next_sequence(floor)
            written = _stage_files(txn, files)
            replaced = _replaced_formats(bases, files)
            manifests = _updated_manifests(bases, files, written, run_id, sequence)
            txn.commit([(m.filename, m.to_json().encode()) for m in manifests], sequence)
        self._remove(replaced)
        names = {f.filename for f in files}
        whole = {m.filename: sequence for m in manifests if set(m.files) <= names}
        return written, whole

    def _write_sharded(self, files: list[PendingFile], run_id: str | None) -> list[WrittenFile]:
        """A set with sharded folders, written by every rank (see the class docstring).

        Every step only the coordinator takes happens before the ranks start writing (the hooks,
        the set, its staged folders, their skeletons) or after every rank's parts are durable
        (the other files, the manifests, the commit), and the coordinator then tells every rank
        the outcome: a failure anywhere fails the save on every rank, and nothing is committed
        before every rank's data is on disk. DCP itself reports a failed write on any rank to
        all of them.
        """
        from ksuit.storage.sharded.save import skeleton_of, write_skeleton, write_tensors

        group = self.group
        world = distributed.world_size(group)
        sharded = [f for f in files if f.fmt == SHARDED_FORMAT]
        if distributed.rank(group) != 0:
            staged = distributed.broadcast_object(None, group=group)
            if isinstance(staged, str):
                raise RuntimeError(f"the sharded save could not start on rank 0: {staged}")
            write_tensors(self._backend, [(staged[f.filename], f.payload) for f in sharded], group)
            outcome = distributed.broadcast_object(None, group=group)
            if outcome is not None:
                raise RuntimeError(f"the sharded save failed on rank 0 and is not on disk: {outcome}")
            return []
        manifest_of: dict[str, str | None] = {f.filename: f.manifest for f in files}
        manifest_of.update({m: m for f in files if (m := f.manifest) is not None})
        phase, committed = "start", None
        try:
            with contextlib.ExitStack() as stack:
                if self.hooks is not None:
                    self._backend.ensure_folder()
                    stack.enter_context(self._backend.lock())  # held until the save committed
                    self.hooks.before_save(self._backend, files, estimate_nbytes(files))
                txn = stack.enter_context(self._backend.begin_set(manifest_of, estimate_nbytes(files)))
                staged_of: dict[str, StagedFolder] = {}
                skeletons: dict[str, WrittenFile] = {}
                for f in sharded:
                    staged_of[f.filename] = txn.stage_folder(f.filename)
                    skeleton = skeleton_of(f.payload, f.role, world)
                    skeletons[f.filename] = write_skeleton(self._backend, staged_of[f.filename], skeleton)
                distributed.broadcast_object(staged_of, group=group)
                phase = "write"
                parts = write_tensors(
                    self._backend, [(staged_of[f.filename], f.payload) for f in sharded], group
                )
                phase = "commit"
                bases = self._base_manifests(files)
                floor = max([txn.sequence_floor] + [(m.commit_sequence or 0) + 1 for m in bases.values()])
                sequence = next_sequence(floor)
                parts_of = {f.filename: [*parts[f.filename], skeletons[f.filename]] for f in sharded}
                written = _stage_files(txn, files, staged_of, parts_of)
                replaced = _replaced_formats(bases, files)
                listed = {name: {p.name: (p.size, p.checksum) for p in ps} for name, ps in parts_of.items()}
                manifests = _updated_manifests(bases, files, written, run_id, sequence, listed)
                txn.commit([(m.filename, m.to_json().encode()) for m in manifests], sequence)
                names = {f.filename for f in files}
                committed = {m.filename: sequence for m in manifests if set(m.files) <= names}
            distributed.broadcast_object(None, group=group)  # committed: every rank returns
            phase = "done"
        except BaseException as e:
            if phase in ("start", "commit"):  # the other ranks wait for the coordinator: tell them
                distributed.broadcast_object(f"{type(e).__name__}: {e}", group=group)
            raise  # "write": DCP has told every rank already
        finally:
            if self.hooks is not None:
                self.hooks.after_save(self._backend, files, committed)
        self._remove(replaced)
        return written

    def _remove(self, names: list[str]) -> None:
        """Deletes members of earlier sets that this commit replaced by a file of another format
        (no manifest lists them any more); a failure leaves them as standalone files."""
        if not names:
            return
        try:
            self._backend.delete(names)
        except OSError as e:
            logger.warning(
                "could not remove %s, replaced in its set by another format: %s", ", ".join(names), e
            )

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def _base_manifests(self, files: list[PendingFile]) -> dict[tuple[str, str], Manifest]:
        bases: dict[tuple[str, str], Manifest] = {}
        for f in files:
            if f.group is not None and f.tag is not None and (f.group, f.tag) not in bases:
                bases[(f.group, f.tag)] = self._load_or_new_manifest(f.group, f.tag)
        return bases

    def _load_or_new_manifest(self, group: str, tag: str) -> Manifest:
        try:
            return read_manifest(self._backend, manifest_filename(group, tag))
        except FileNotFoundError:
            pass
        except CorruptCheckpointError as e:
            logger.warning("replacing unreadable manifest: %s", e)
        return Manifest(group=group, tag=tag)


def _stage_files(
    txn: SetTransaction,
    files: list[PendingFile],
    staged: Mapping[str, StagedFolder] | None = None,
    parts: Mapping[str, list[WrittenFile]] | None = None,
) -> list[WrittenFile]:
    """Stages every file of a save: each sharded folder (written by the ranks) with its parts,
    and each other file, a payload that an earlier file of the save shares staged as the same
    bytes (`stage_same`) where the backend can."""
    written: list[WrittenFile] = []
    first_of: dict[tuple[int, str], str] = {}  # (payload object, format) -> first file name
    for f in files:
        if f.fmt == SHARDED_FORMAT:
            assert staged is not None and parts is not None
            written.append(txn.add_folder(staged[f.filename], parts[f.filename]))
            continue
        key = (id(f.payload), f.fmt)
        same = first_of.get(key)
        w = txn.stage_same(f.filename, same) if same is not None else None
        if w is None:
            w = txn.stage(f.filename, _payload_writer(f), file_nbytes(f))
            first_of.setdefault(key, f.filename)
        written.append(w)
    return written


def _replaced_formats(bases: dict[tuple[str, str], Manifest], files: list[PendingFile]) -> list[str]:
    """Members of the sets being updated that a new file replaces in another format (a leaf
    saved sharded by one run and as a `.th` file by a resume on one process, or the reverse):
    dropped from the manifests, so a set never lists two copies of one file."""
    new = {f.filename for f in files}
    stems = {stem for f in files if (stem := _stem(f.filename)) is not None}
    replaced = []
    for manifest in bases.values():
        for name in list(manifest.files):
            if name not in new and _stem(name) in stems:
                del manifest.files[name]
                replaced.append(name)
    return replaced


def _stem(filename: str) -> tuple[str, str, str, str] | None:
    """A checkpoint file's name without its format: `(name, info, tag, role)`."""
    parsed = parse_checkpoint_filename(filename)
    return None if parsed is None else (parsed.name, parsed.info, parsed.tag, parsed.role)


def _payload_writer(f: PendingFile) -> WriteFn:
    fmt = get_format(f.fmt)

    def write(out: WriteStream) -> None:
        fmt.write(f.payload, out)

    return write


def _updated_manifests(
    bases: dict[tuple[str, str], Manifest],
    files: list[PendingFile],
    written: list[WrittenFile],
    run_id: str | None,
    sequence: int,
    parts_of: dict[str, dict[str, tuple[int, str]]] | None = None,
) -> list[Manifest]:
    metrics: dict[tuple[str, str], dict[str, float] | None] = {}
    for f, w in zip(files, written, strict=True):
        if f.group is None or f.tag is None:
            continue
        m = bases[(f.group, f.tag)]
        parts = (parts_of or {}).get(f.filename)
        m.files[f.filename] = ManifestEntry(w.size, w.checksum, f.role, f.training_iteration, parts)
        m.training_iteration = f.training_iteration
        m.run_id = run_id
        m.commit_sequence = sequence
        if metrics.get((f.group, f.tag)) is None:
            metrics[(f.group, f.tag)] = f.metrics
    for key, m in bases.items():
        found = metrics.get(key)
        m.metrics = dict(found) if found else None  # the set is of this save now
    return list(bases.values())
