"""Objects opened for loading.

`ObjectFile` reads small ranges of a large object straight from the store (a safetensors
header) and, the first time the whole file is needed (`stream`, `checksum`, `local_path`: what
`torch.load` and the manifest check use; or any read of an object of at most `WHOLE_BYTES`),
downloads it once into a private temporary file (in `tempfile.gettempdir()`), so the bytes
checked are the bytes loaded, memory stays bounded (a `.th` file is memory-mapped from there)
and nothing is fetched twice. Data objects of committed sets never change once written, so their
downloads are kept in a small cache of this process (`DownloadCache`, at most
`KSUIT_OBJECT_CACHE_BYTES` bytes, 1 GiB by default, 0 turns it off): a resume that checks a set
and then loads it downloads each file once. `BytesFile` is a small file already in memory.
"""

from __future__ import annotations

import collections
import io
import os
import tempfile
import threading
from typing import IO

from ksuit.storage.backend import OpenedFile
from ksuit.storage.local.safe_files import hash_fd
from ksuit.storage.objectstore.stores import Store

WHOLE_BYTES = 8 << 20  # objects this small are downloaded whole on their first read


class DownloadCache:
    """Downloaded immutable objects (by URL), least recently used dropped first."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._files: collections.OrderedDict[str, tuple[str, int, str | None]] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def take(self, url: str, size: int) -> tuple[int, str, str | None] | None:
        """`(open descriptor, path, digest or None)` of the cached download of `url`, or None."""
        with self._lock:
            found = self._files.get(url)
            if found is None or found[1] != size:
                return None
            self._files.move_to_end(url)
            try:
                return os.open(found[0], os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)), found[0], found[2]
            except FileNotFoundError:  # removed from the temporary folder behind our back
                self._drop(url)
                return None

    def keep(self, url: str, path: str, size: int, digest: str | None) -> bool:
        """Takes over the file at `path` (True), or leaves it to the caller when it does not fit."""
        if size > self.max_bytes // 2:
            return False
        with self._lock:
            if url in self._files:
                return False
            self._files[url] = (path, size, digest)
            self._bytes += size
            while self._bytes > self.max_bytes:
                self._drop(next(iter(self._files)))
            return True

    def _drop(self, url: str) -> None:
        path, size, _ = self._files.pop(url)
        self._bytes -= size
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


CACHE = DownloadCache(int(os.environ.get("KSUIT_OBJECT_CACHE_BYTES", str(1 << 30))))


class ObjectFile(OpenedFile):
    """One object of a store, named `name` (its logical file name) at `location` (its URL).
    `immutable`: the object never changes (a data object of a set), so its download may be
    shared through the cache."""

    def __init__(self, store: Store, path: str, name: str, location: str, size: int, immutable: bool = False):
        self.store = store
        self.path = path
        self.name = name
        self.location = location
        self.size = size
        self.immutable = immutable and CACHE.max_bytes > 0
        self._url = store.url(path)
        self._local: str | None = None
        self._owned = False  # the temporary file is ours to remove (not the cache's)
        self._fd = -1
        self._digest: str | None = None  # of the downloaded bytes, when hashed on the way
        self._download_lock = threading.Lock()

    def read_at(self, offset: int, size: int) -> bytes:
        if self._fd < 0 and self.size > WHOLE_BYTES:
            end = min(self.size, offset + size)
            return self.store.read_range(self.path, offset, end) if end > offset else b""
        return os.pread(self._materialize(), size, offset)

    def _materialize(self) -> int:
        if self._fd >= 0:
            return self._fd
        with self._download_lock:  # a hash thread and a loader may ask at once: one download
            if self._fd >= 0:
                return self._fd
            return self._download()

    def _download(self) -> int:
        if self.immutable:
            cached = CACHE.take(self._url, self.size)
            if cached is not None:
                self._fd, self._local, self._digest = cached
                return self._fd
        fd, local = tempfile.mkstemp(prefix="ksuit-object-", suffix=f"-{self.name[-80:]}")
        try:
            with os.fdopen(os.dup(fd), "wb") as out:
                digest = self.store.download(self.path, out, self.size)
            if os.fstat(fd).st_size != self.size:
                raise OSError(
                    f"{self.location} changed while it was read ({os.fstat(fd).st_size} bytes instead of "
                    f"{self.size}); load it again"
                )
        except BaseException:
            os.close(fd)
            os.unlink(local)
            raise
        self._fd, self._local, self._owned, self._digest = fd, local, True, digest
        return fd

    def stream(self) -> IO[bytes]:
        return open(self.local_path(), "rb")  # its own offset, at 0

    def checksum(self) -> tuple[int, str]:
        fd = self._materialize()
        return (self.size, self._digest) if self._digest is not None else hash_fd(fd)

    def local_path(self) -> str:
        self._materialize()
        assert self._local is not None
        return self._local

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._local is not None and self._owned:
            if not (self.immutable and CACHE.keep(self._url, self._local, self.size, self._digest)):
                try:
                    os.unlink(self._local)
                except FileNotFoundError:
                    pass
        self._local, self._owned = None, False


class BytesFile(OpenedFile):
    """A small file held in memory."""

    def __init__(self, data: bytes, name: str, location: str):
        self.data = data
        self.name = name
        self.location = location
        self.size = len(data)

    def read_at(self, offset: int, size: int) -> bytes:
        return self.data[offset : offset + size]

    def stream(self) -> IO[bytes]:
        return io.BytesIO(self.data)

    def checksum(self) -> tuple[int, str]:
        import xxhash

        return len(self.data), xxhash.xxh3_64_hexdigest(self.data)

    def local_path(self) -> str | None:
        return None

    def close(self) -> None:
        pass
