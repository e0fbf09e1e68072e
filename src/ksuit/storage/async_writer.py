"""Asynchronous set writing: snapshot now, write in a background thread, in order.

`AsyncSetWriter` wraps a `SetWriter` (so any backend) with the same `SetSink` interface:
`write_set()` copies every tensor of a save into host buffers (pinned for CUDA sources) and
returns; one background thread writes the sets through the wrapped writer, so every
crash-safety guarantee of the synchronous path holds (staging, streaming checksum, manifest,
atomic commit). Sets are written in submission order, so a `latest` of an older save never replaces
a newer one. The first error of a background write is re-raised by the next `submit()` or
`flush()`.

Interpreter exit waits for every queued save of every open writer (one exit handler for all). A
save that fails then cannot be raised to anyone: its error is printed to stderr and the process
ends with exit code 1 (`os._exit`, skipping exit handlers not yet run), because an exception in an
exit handler is only printed and a lost checkpoint would otherwise end in exit code 0.

Peak extra host memory: `max_pending` snapshot buffers, each as large as the tensors of the
largest save so far (every tensor rounded up to 64 bytes; aliases and tensors saved under two
tags stored once), or as `prepare(nbytes)` asked if that is more, i.e. about `max_pending` x
the saved state, plus the pickled structure of the files being written. The buffers are kept
until `close()`, so steady-state saving allocates nothing. `write_set()` blocks while all
buffers are in flight, so a slow disk slows the saver rather than growing memory.

`prepare(nbytes)` maps the buffers before the first save and touches them in a background
thread (`ksuit.storage.host_memory`), so that the first save stalls no longer than later ones.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import queue
import sys
import threading
import traceback
import weakref
from typing import Any

from ksuit.storage.backend import Backend, Location
from ksuit.storage.sets import OnWritten, PendingFile, SetWriter
from ksuit.storage.snapshot import SnapshotBuffer, SnapshotPool, take_snapshot
from ksuit.utils import gc_pause

logger = logging.getLogger(__name__)

_Job = tuple[list[PendingFile], "str | None", "OnWritten | None", SnapshotBuffer]

EXIT_CODE_WRITE_FAILED = 1
_open_writers: weakref.WeakValueDictionary[int, AsyncSetWriter] = weakref.WeakValueDictionary()
_writer_ids = itertools.count()
_exit_hook_lock = threading.Lock()
_exit_hook_registered = False


def _track(writer: AsyncSetWriter) -> int:
    """Adds `writer` to the writers the exit handler closes; returns its key."""
    global _exit_hook_registered
    with _exit_hook_lock:
        if not _exit_hook_registered:
            atexit.register(_close_all_at_exit)
            _exit_hook_registered = True
        key = next(_writer_ids)
        _open_writers[key] = writer
        return key


def _close_all_at_exit() -> None:
    """Closes every open writer of this process, oldest first, so every queued save reaches the
    disk; if any fails, reports each failure on stderr and ends the process with exit code 1."""
    failures: list[tuple[str, BaseException]] = []
    for key in sorted(_open_writers.keys()):
        writer = _open_writers.get(key)
        if writer is None or writer.pid != os.getpid():  # a forked child has no writer thread
            continue
        try:
            writer.close()
        except BaseException as e:
            failures.append((writer.backend.location, e))
    if not failures:
        return
    for folder, error in failures:
        print(
            f"ksuit: a checkpoint save queued before exit failed; it is not on disk in {folder}:",
            file=sys.stderr,
        )
        traceback.print_exception(error, file=sys.stderr)
    try:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(EXIT_CODE_WRITE_FAILED)


def _snapshot(payloads: list[Any], buffer: SnapshotBuffer) -> list[Any]:
    """`take_snapshot`, with each DTensor (a sharded save's) copied as its own local shard."""
    if not any(_has_dtensor(p) for p in payloads):
        return take_snapshot(payloads, buffer)
    from ksuit.storage.sharded.local import rewrap, to_local

    pairs = [to_local(p) for p in payloads]
    copies = take_snapshot([local for local, _ in pairs], buffer)
    return [rewrap(copy, layout) for copy, (_, layout) in zip(copies, pairs, strict=True)]


def _has_dtensor(obj: Any) -> bool:
    if "torch.distributed.tensor" not in sys.modules:  # no DTensor can exist: no walk
        return False
    from torch.distributed.tensor import DTensor

    from ksuit.storage.formats import iter_tensors

    return any(isinstance(t, DTensor) for t in iter_tensors(obj))


class AsyncSetWriter:
    """Queues sets for a `SetWriter` running in one background thread."""

    def __init__(self, set_writer: SetWriter | Backend | Location, max_pending: int = 1):
        self.set_writer = set_writer if isinstance(set_writer, SetWriter) else SetWriter(set_writer)
        self.pool = SnapshotPool(max_pending)
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._errors: list[BaseException] = []
        self._errors_lock = threading.Lock()
        self._closed = False
        self.pid = os.getpid()
        self._thread = threading.Thread(
            target=self._run, name=f"ksuit-writer:{self.set_writer.backend.location}", daemon=True
        )
        self._thread.start()
        self._key = _track(self)

    @property
    def backend(self) -> Backend:
        return self.set_writer.backend

    def prepare(self, nbytes: int, pinned: bool = False) -> None:
        """Readies `nbytes` of snapshot memory per buffer in the background (pinned for CUDA
        sources); returns at once. Call it from the thread that saves."""
        if self._closed:
            raise RuntimeError("this checkpoint writer is closed; create a new one to save again")
        self.pool.prepare(nbytes, pinned)

    def write_set(
        self, files: list[PendingFile], run_id: str | None = None, on_written: OnWritten | None = None
    ) -> None:
        """Snapshots the payloads (waiting for a free buffer) and queues the write."""
        if self._closed:
            raise RuntimeError("this checkpoint writer is closed; create a new one to save again")
        self.raise_pending_error()
        buffer = self.pool.acquire()
        # a payload two files share (one object) is copied once and stays one object, so the
        # set writer still writes its bytes once
        unique = {id(f.payload): f.payload for f in files}
        try:
            # once a buffer is free, every earlier write that held it has ended: report its failure
            self.raise_pending_error()
            payloads = dict(zip(unique, _snapshot(list(unique.values()), buffer), strict=True))
        except BaseException:
            self.pool.release(buffer)
            raise
        snap_files = [f.with_payload(payloads[id(f.payload)]) for f in files]
        gc_pause.hold()  # until written: no collection finds this save's objects alive
        self._queue.put((snap_files, run_id, on_written, buffer))

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                self._queue.task_done()
                return
            files, run_id, on_written, buffer = job
            try:
                self.set_writer.write_set(files, run_id, on_written)
            except BaseException as e:  # kept and re-raised on the caller's thread
                logger.error("background checkpoint write to %s failed: %s", self.backend.location, e)
                with self._errors_lock:
                    self._errors.append(e)
            finally:
                del files, job
                self.pool.release(buffer)
                gc_pause.release()
                self._queue.task_done()

    def raise_pending_error(self) -> None:
        with self._errors_lock:
            if not self._errors:
                return
            first, self._errors = self._errors[0], []
        # the original exception, so callers can catch what a sync save raises (OSError ENOSPC, ...)
        first.add_note(
            f"raised by a background checkpoint write to {self.backend.location}; that save is not on disk"
        )
        raise first

    def flush(self) -> None:
        """Blocks until every queued set is on disk; re-raises the first background error."""
        self._queue.join()
        self.raise_pending_error()

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._queue.put(None)
            self._thread.join()
            self.pool.close()
            _open_writers.pop(self._key, None)
            self.set_writer.close()  # e.g. a mirroring writer waits for its replication

    def __del__(self) -> None:  # pragma: no cover
        if not getattr(self, "_closed", True):
            try:
                self._queue.put(None)
            except Exception:
                pass
