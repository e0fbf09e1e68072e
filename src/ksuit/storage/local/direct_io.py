"""Large checkpoint files written with O_DIRECT through aligned bounce buffers.

Why: on the machines ksuit was measured on, buffered writes of a large file plus fsync reach
about half of what the device takes; writing 16 MiB aligned blocks with O_DIRECT (bypassing
the page cache) while the next block is being filled gets close to the device's limit.

How it keeps every guarantee of `ksuit.storage.local`: `DirectStream` wraps the `HashingSink`
of a temporary file. Bytes arrive in file order through `write()`, are copied into one of two
page-aligned 16 MiB bounce buffers, hashed there (so the xxh3 checksum covers exactly the bytes
written, in order) and written with `pwrite` on a second, O_DIRECT descriptor of the same
temporary file by a helper thread, while the next buffer fills. The unaligned head (when the
stream does not start on a block boundary) and the tail under one block go through the sink's
own buffered descriptor. The sink's byte count, hash and file position are brought up to date,
so the caller's `fsync_and_close()` (which syncs the inode, whatever descriptor wrote it),
journal and rename are unchanged.

On by default for files of 32 MiB and more; `KSUIT_DIRECT_IO=0` turns it off (what it gains is
measured by `make bench`: the README's performance table).
Where O_DIRECT is unavailable (tmpfs, some network file systems, other OSes) the stream falls
back to the sink's buffered writes transparently.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

from typing_extensions import Buffer

from ksuit.storage.backend import WriteStream
from ksuit.storage.local.files import HashingSink

BLOCK = 4096
BOUNCE_BYTES = 16 << 20
MIN_DIRECT_BYTES = 32 << 20  # smaller files gain nothing from O_DIRECT

_local = threading.local()


def direct_io_enabled() -> bool:
    return hasattr(os, "O_DIRECT") and os.environ.get("KSUIT_DIRECT_IO", "1") != "0"


def _bounce_buffers() -> list[mmap.mmap]:
    """Two page-aligned bounce buffers per thread, kept: touched memory is fast memory."""
    buffers: list[mmap.mmap] | None = getattr(_local, "buffers", None)
    if buffers is None or len(buffers[0]) != BOUNCE_BYTES:  # made anew when the size changed
        buffers = _local.buffers = [mmap.mmap(-1, BOUNCE_BYTES) for _ in range(2)]
    return buffers


_Job = tuple["Future[None]", Callable[..., None], tuple[Any, ...]]


class _BlockWriter:
    """Runs block writes in order on one helper thread, so the next bounce buffer fills meanwhile.

    Not a `concurrent.futures` pool: those refuse new work once interpreter shutdown has begun,
    which is exactly when the exit flush of queued asynchronous saves writes its files. Where no
    thread can be started (Python >= 3.12 during shutdown) the writes run inline: slower, not lost.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        thread: threading.Thread | None = threading.Thread(
            target=self._run, name="ksuit-direct-io", daemon=True
        )
        try:
            thread.start()  # type: ignore[union-attr]
        except RuntimeError:  # "can't create new thread at interpreter shutdown"
            thread = None
        self._thread = thread

    def submit(self, fn: Callable[..., None], *args: Any) -> Future[None]:
        future: Future[None] = Future()
        if self._thread is None:
            _run_job(future, fn, args)
        else:
            self._jobs.put((future, fn, args))
        return future

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            _run_job(*job)

    def shutdown(self) -> None:
        """Waits for the submitted writes and stops the helper thread; idempotent."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None


def _run_job(future: Future[None], fn: Callable[..., None], args: tuple[Any, ...]) -> None:
    try:
        fn(*args)
        future.set_result(None)
    except BaseException as e:  # handed to whoever waits on the future
        future.set_exception(e)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < data.nbytes:
        done += os.pwrite(fd, data[done:], offset + done)


class DirectStream:
    """A write-only stream over a `HashingSink` that sends whole aligned blocks with O_DIRECT."""

    def __init__(self, sink: HashingSink):
        self.sink = sink
        self.start = sink.nbytes
        self.pos = self.start  # file offset of the next byte
        self._direct_fd = os.open(sink.path, os.O_WRONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
        self._buffers = _bounce_buffers()
        self._views = [memoryview(b) for b in self._buffers]
        self._current = 0
        self._fill = 0  # bytes in the current bounce buffer
        self._fill_offset = -1  # file offset of the current bounce buffer's first byte
        self._pending: list[Future[None] | None] = [None, None]
        self._pool = _BlockWriter()
        self.fallback = False

    def write(self, data: Buffer, /) -> int:
        view = memoryview(data).cast("B")
        total = view.nbytes
        if self.pos % BLOCK and self._fill_offset < 0:  # unaligned head: buffered
            head = min(total, BLOCK - self.pos % BLOCK)
            self._buffered(view[:head])
            view = view[head:]
        while view.nbytes:
            if self._fill_offset < 0:
                self._fill_offset = self.pos
            n = min(view.nbytes, BOUNCE_BYTES - self._fill)
            dst = self._views[self._current]
            dst[self._fill : self._fill + n] = view[:n]  # one memcpy
            self.sink.account(dst[self._fill : self._fill + n])
            self._fill += n
            self.pos += n
            view = view[n:]
            if self._fill == BOUNCE_BYTES:
                self._submit(self._fill)
        return total

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def _buffered(self, view: memoryview) -> None:
        self._pwrite(self.sink.fileno(), view, self.pos)
        self.sink.account(view)
        self.pos += view.nbytes

    def _pwrite(self, fd: int, view: memoryview, offset: int) -> None:
        try:
            _pwrite_all(fd, view, offset)
        except OSError as e:
            self.sink.record_error(e)
            raise

    def _submit(self, nbytes: int) -> None:
        """Writes the first `nbytes` (a multiple of BLOCK) of the current buffer in the background
        and switches to the other buffer once its previous write is done."""
        index, offset = self._current, self._fill_offset
        self._pending[index] = self._pool.submit(self._write_block, self._views[index][:nbytes], offset)
        self._current = 1 - index
        self._wait(self._current)
        self._fill = 0
        self._fill_offset = -1

    def _write_block(self, view: memoryview, offset: int) -> None:
        if not self.fallback:
            try:
                _pwrite_all(self._direct_fd, view, offset)
                return
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: this file system takes no O_DIRECT writes
                    self.sink.record_error(e)
                    raise
                self.fallback = True
        self._pwrite(self.sink.fileno(), view, offset)

    def _wait(self, index: int) -> None:
        future, self._pending[index] = self._pending[index], None
        if future is not None:
            future.result()

    def close(self) -> None:
        """Writes what is left (aligned part direct, tail buffered) and hands the sink back."""
        try:
            if self._fill:
                aligned = self._fill // BLOCK * BLOCK
                tail = self._views[self._current][aligned : self._fill]
                tail_offset = self._fill_offset + aligned
                if aligned:
                    self._pending[self._current] = self._pool.submit(
                        self._write_block, self._views[self._current][:aligned], self._fill_offset
                    )
                if tail.nbytes:
                    self._pwrite(self.sink.fileno(), tail, tail_offset)
            for i in (0, 1):
                self._wait(i)
        finally:
            self._release()
            os.lseek(self.sink.fileno(), self.pos, os.SEEK_SET)

    def abort(self) -> None:
        """Stops after a failed write: waits for the block writes in flight (their errors are
        dropped: the caller is already failing) and releases the descriptor. The caller removes
        the file."""
        try:
            for future in self._pending:
                if future is not None:
                    future.exception()
        finally:
            self._release()

    def _release(self) -> None:
        self._pool.shutdown()
        if self._direct_fd >= 0:
            os.close(self._direct_fd)
            self._direct_fd = -1


@contextlib.contextmanager
def open_stream(sink: HashingSink, expected_nbytes: int) -> Iterator[WriteStream]:
    """`with open_stream(sink, n) as out:` writes through O_DIRECT when it pays off and works
    here, else straight through `sink`."""
    stream: DirectStream | None = None
    if expected_nbytes >= MIN_DIRECT_BYTES and direct_io_enabled():
        try:
            stream = DirectStream(sink)
        except OSError:  # O_DIRECT refused by this file system
            stream = None
    if stream is None:
        yield sink
        return
    try:
        yield stream
    except BaseException:
        stream.abort()
        raise
    stream.close()
