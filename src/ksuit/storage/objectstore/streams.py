"""Write streams that upload one object while hashing its bytes (the `WriteStream` formats write
into on an object store).

`UploadStream` hashes (xxh3-64) and counts every byte in file order; a store implements where
the bytes go (`_send`), how the object is completed (`_finish`: the object exists whole, or not
at all) and abandoned (`_abort`). `PartBuffers` is the bounded pool of part buffers a multipart
upload fills: at most `count` parts exist at once, so the extra memory of an upload is at most
`count x part_size` whatever the file size.
"""

from __future__ import annotations

import io
import threading
from abc import ABC, abstractmethod

import xxhash
from typing_extensions import Buffer


class UploadStream(ABC):
    """A write-only stream into one new object; `finish()` completes it, `abort()` abandons it."""

    def __init__(self, location: str):
        self.location = location
        self._hash = xxhash.xxh3_64()
        self.nbytes = 0
        self._closed = False

    def write(self, data: Buffer, /) -> int:
        if self._closed:
            raise ValueError(f"write to {self.location} after the upload ended")
        view = memoryview(data).cast("B")
        if view.nbytes:
            self._hash.update(view)
            self._send(view)
            self.nbytes += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.nbytes

    def flush(self) -> None:  # noqa: B027 - bytes go out in parts, not on flush
        pass

    def writable(self) -> bool:
        return True

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def finish(self) -> None:
        """Completes the object: after this it exists with every byte written."""
        if self._closed:
            raise ValueError(f"the upload of {self.location} already ended")
        self._closed = True
        try:
            self._finish()
        except BaseException:
            self._abort()
            raise

    def abort(self) -> None:
        """Abandons the upload (best effort; recovery removes what a crash leaves)."""
        if not self._closed:
            self._closed = True
            self._abort()

    @abstractmethod
    def _send(self, view: memoryview) -> None: ...

    @abstractmethod
    def _finish(self) -> None: ...

    @abstractmethod
    def _abort(self) -> None: ...


class PartBuffers:
    """At most `count` part buffers of up to `size` bytes in use at once; `acquire()` waits while
    all are in use, and hands out a recycled full-size buffer, or a new one: full-size when
    `preallocate` (a file of several parts), else empty, to grow (a small file)."""

    def __init__(self, count: int, size: int, preallocate: bool = False):
        if count < 1 or size < 1:
            raise ValueError(f"need at least one part buffer of at least one byte, got {count} x {size}")
        self.count = count
        self.size = size
        self.preallocate = preallocate
        self._recycled: list[bytearray] = []
        self._in_use = 0
        self._cond = threading.Condition()

    def acquire(self) -> bytearray:
        with self._cond:
            while self._in_use >= self.count:
                self._cond.wait()
            self._in_use += 1
            if self._recycled:
                return self._recycled.pop()
        # outside the lock: zero-filling a part takes a while
        return bytearray(self.size) if self.preallocate else bytearray()

    def release(self, buffer: bytearray) -> None:
        """Gives a buffer back; a full-size one is kept for reuse, a shorter one dropped."""
        with self._cond:
            self._in_use -= 1
            if len(buffer) == self.size and len(self._recycled) < self.count:
                self._recycled.append(buffer)
            self._cond.notify()


class PartReader(io.RawIOBase):
    """A part buffer as a seekable file, so the HTTP client reads it in small chunks instead of
    copying it whole (a `bytearray` body is copied twice on its way to the socket)."""

    def __init__(self, buffer: bytearray):
        super().__init__()
        self._view = memoryview(buffer)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, min(len(self._view), base + offset))
        return self._pos

    def readinto(self, buffer: Buffer) -> int:
        out = memoryview(buffer).cast("B")
        n = min(out.nbytes, len(self._view) - self._pos)
        out[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def read(self, size: int | None = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else min(len(self._view), self._pos + size)
        data = bytes(self._view[self._pos : end])
        self._pos = end
        return data

    def __len__(self) -> int:
        return len(self._view)

    def close(self) -> None:  # the HTTP client may close it: the buffer stays for a retry
        pass

    def release(self) -> None:
        """Lets go of the buffer (which its pool may then resize and reuse)."""
        self._view.release()
