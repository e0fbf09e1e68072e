"""Tiered saving: commit every set locally first, then replicate it to a mirror (an object store,
or any backend) in the background.

`MirroringSetWriter` is a `SetWriter` (so `AsyncSetWriter` wraps it as any other): each set is
committed to the local folder with the local protocol, at local speed; right after the commit,
still on the writing thread, the files of every set the save touched are *opened* (which pins
exactly the committed bytes: a later save replaces names, not the opened files) and a job is
queued. One background thread replicates the jobs in order, each as one set on the mirror (its
own protocol: atomic, checksummed), re-using the mirror's objects for files whose size and
checksum did not change. A job that fails is retried (`attempts`, with backoff), then reported
(logged, and kept in `failures`); it never blocks training and never touches the local set. A
newer job for the same sets replaces one still waiting, so a slow mirror delays replication
instead of growing a backlog. `close()` waits for the queue.

A sharded checkpoint folder (`..._model.dcp`) is pinned part by part (every part its manifest
lists, opened) and replicated as a folder with the mirror's own folder protocol
(`stage_folder`, `write_part` for each part, `add_folder`), so it becomes visible on the mirror
with its set and its digest must equal the manifest's. Sets of a sharded save are written by
every rank, but only rank 0 of the writer's group replicates them.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ksuit.layout import SHARDED_FORMAT, is_sharded_filename
from ksuit.storage.backend import Backend, Location, OpenedFile, WriteFn, WriteStream, WrittenFile
from ksuit.storage.errors import ConcurrentWriterError, CorruptCheckpointError, StoreAccessError
from ksuit.storage.locations import open_backend
from ksuit.storage.manifest import MAX_MANIFEST_BYTES, Manifest, read_manifest
from ksuit.storage.sets import PendingFile, SaveHooks, SetWriter
from ksuit.utils import distributed

logger = logging.getLogger(__name__)
COPY_CHUNK = 8 << 20


@dataclass
class _Job:
    """The committed state of some sets, pinned by open files."""

    manifests: dict[str, bytes]
    files: dict[str, OpenedFile]
    loose: list[str] = field(default_factory=list)
    folders: dict[str, dict[str, OpenedFile]] = field(default_factory=dict)  # sharded: {folder: parts}

    def nbytes(self) -> int:
        parts = [f for folder in self.folders.values() for f in folder.values()]
        return sum(f.size for f in [*self.files.values(), *parts])

    def close(self) -> None:
        for f in [*self.files.values(), *(p for folder in self.folders.values() for p in folder.values())]:
            f.close()
        self.files.clear()
        self.folders.clear()


@dataclass(frozen=True)
class ReplicationFailure:
    """A set that did not reach the mirror: which manifests (or files), and why."""

    names: tuple[str, ...]
    error: BaseException


class Replicator:
    """Copies committed sets of `source` to `mirror` on one background thread."""

    def __init__(self, source: Backend, mirror: Backend, attempts: int = 3, first_delay: float = 1.0):
        self.source = source
        self.mirror = mirror
        self.attempts = max(1, attempts)
        self.first_delay = first_delay
        self.failures: list[ReplicationFailure] = []
        self.replicated = 0
        self._pending: list[_Job] = []
        self._cond = threading.Condition()
        self._idle = threading.Event()
        self._idle.set()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"ksuit-mirror:{mirror.location}", daemon=True)
        self._thread.start()

    def submit(self, files: list[PendingFile]) -> None:
        """Pins the committed state of the sets of `files` and queues it (never waits)."""
        try:
            job = self._pin(files)
        except Exception as e:  # reading back what was just committed: report, never fail the save
            self._fail(tuple(sorted({f.manifest or f.filename for f in files})), e)
            return
        with self._cond:
            if self._closed:
                job.close()
                return
            kept = []
            for old in self._pending:  # a newer version of the same sets makes a waiting job moot
                if set(old.manifests) <= set(job.manifests) and set(old.loose) <= set(job.loose):
                    old.close()
                else:
                    kept.append(old)
            self._pending = [*kept, job]
            self._idle.clear()
            self._cond.notify()

    def _pin(self, files: list[PendingFile]) -> _Job:
        manifests = sorted({m for f in files if (m := f.manifest) is not None})
        job = _Job({}, {}, [f.filename for f in files if f.manifest is None])
        try:
            for name in manifests:
                data = self.source.read_small(name, MAX_MANIFEST_BYTES, "manifest")
                job.manifests[name] = data
                for file_name, entry in Manifest.from_json(
                    data, self.source.file_location(name)
                ).files.items():
                    if is_sharded_filename(file_name):
                        folder = self.source.child(file_name)
                        parts = job.folders[file_name] = {}
                        for part in sorted(entry.parts or {}):
                            parts[part] = folder.open(part)
                    else:
                        job.files[file_name] = self.source.open(file_name)
            for name in job.loose:
                job.files[name] = self.source.open(name)
        except BaseException:
            job.close()
            raise
        return job

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._idle.set()
                    self._cond.wait()
                if not self._pending:
                    self._idle.set()
                    return
                job = self._pending.pop(0)
            try:
                self._replicate_with_retries(job)
            finally:
                job.close()

    def _replicate_with_retries(self, job: _Job) -> None:
        names = tuple(sorted(job.manifests)) + tuple(job.loose)
        for attempt in range(1, self.attempts + 1):
            try:
                self._replicate(job)
                self.replicated += 1
                return
            except (ConcurrentWriterError, StoreAccessError, CorruptCheckpointError) as e:
                self._fail(names, e)  # retrying cannot help
                return
            except Exception as e:
                if attempt == self.attempts:
                    self._fail(names, e)
                    return
                logger.warning(
                    "replicating %s to %s failed (attempt %d of %d), retrying: %s",
                    ", ".join(names),
                    self.mirror.location,
                    attempt,
                    self.attempts,
                    e,
                )
                time.sleep(self.first_delay * 2 ** (attempt - 1))

    def _fail(self, names: tuple[str, ...], error: BaseException) -> None:
        self.failures.append(ReplicationFailure(names, error))
        logger.error(
            "could not replicate %s from %s to the mirror %s: %s (the local checkpoints are intact)",
            ", ".join(names),
            self.source.location,
            self.mirror.location,
            error,
        )

    def _replicate(self, job: _Job) -> None:
        manifest_of: dict[str, str | None] = {}
        parsed = {m: Manifest.from_json(d, self.source.file_location(m)) for m, d in job.manifests.items()}
        for m, manifest in parsed.items():
            manifest_of[m] = m
            manifest_of.update(dict.fromkeys(manifest.files, m))
        manifest_of.update(dict.fromkeys(job.loose))
        with self.mirror.begin_set(manifest_of, job.nbytes()) as txn:
            for m, manifest in parsed.items():
                there = self._mirrored(m)
                for name, entry in manifest.files.items():
                    same = there is not None and there.files.get(name) == entry
                    if not same and name in job.files:
                        _copy(txn.stage, job.files[name])
                    elif not same and name in job.folders:
                        staged = txn.stage_folder(name)
                        write = functools.partial(self.mirror.write_part, staged)
                        parts = [_copy(write, f) for f in job.folders[name].values()]
                        written = txn.add_folder(staged, parts)
                        if (written.size, written.checksum) != (entry.size, entry.checksum):
                            raise CorruptCheckpointError(
                                f"{self.source.file_location(name)} changed since its set was committed "
                                f"(its parts add up to {written.size} bytes, digest {written.checksum}; the "
                                f"manifest {m} records {entry.size}, {entry.checksum}); not replicated: "
                                f"run `ksuit verify {self.source.location}`"
                            )
            for name in job.loose:
                _copy(txn.stage, job.files[name])
            sequence = max([txn.sequence_floor] + [m.commit_sequence or 0 for m in parsed.values()])
            txn.commit(sorted(job.manifests.items()), sequence)

    def _mirrored(self, manifest: str) -> Manifest | None:
        try:
            return read_manifest(self.mirror, manifest)
        except (FileNotFoundError, CorruptCheckpointError):
            return None

    def wait(self) -> None:
        """Blocks until every queued job was replicated or reported."""
        self._idle.wait()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()


def _copy(stage: Callable[[str, WriteFn, int], WrittenFile], source: OpenedFile) -> WrittenFile:
    """Streams `source` into `stage(name, write, size)` (a set's file, or a part of a folder)."""

    def write(out: WriteStream) -> None:
        offset = 0
        while offset < source.size:
            chunk = source.read_at(offset, min(COPY_CHUNK, source.size - offset))
            if not chunk:
                raise OSError(
                    f"{source.location} ended at {offset} of {source.size} bytes while it was copied"
                )
            out.write(chunk)
            offset += len(chunk)

    return stage(source.name, write, source.size)


class MirroringSetWriter(SetWriter):
    """A `SetWriter` of the local folder whose committed sets are replicated to `mirror`.
    Retention (`hooks`) applies to the local folder; the mirror keeps every set it received."""

    def __init__(
        self,
        folder: Backend | Location,
        mirror: Backend | Location,
        attempts: int = 3,
        first_delay: float = 1.0,
        hooks: SaveHooks | None = None,
        group: Any = None,
    ):
        super().__init__(folder, hooks=hooks, group=group)
        self.replicator = Replicator(self.backend, open_backend(mirror), attempts, first_delay)

    @property
    def mirror(self) -> Backend:
        return self.replicator.mirror

    @property
    def failures(self) -> list[ReplicationFailure]:
        return self.replicator.failures

    def write(self, files: list[PendingFile], run_id: str | None = None) -> list[WrittenFile]:
        written = super().write(files, run_id)
        sharded = any(f.fmt == SHARDED_FORMAT for f in files)
        if files and (not sharded or distributed.rank(self.group) == 0):  # the coordinator committed it
            self.replicator.submit(files)
        return written

    def close(self) -> None:
        """Waits until every committed set was replicated or reported, then stops the thread."""
        self.replicator.close()
