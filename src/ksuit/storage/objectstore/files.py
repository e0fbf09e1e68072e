"""Objects opened for loading.

`ObjectFile` reads small ranges straight from the store (a safetensors header, a zip
directory) and, the first time the whole file is needed (`stream`, `checksum`, `local_path`:
what `torch.load` and the manifest check use), downloads it once into a private temporary file
(in `tempfile.gettempdir()`), so the bytes checked are the bytes loaded, memory stays bounded
(a `.th` file is memory-mapped from there) and nothing is fetched twice. `close()` removes the
temporary file; tensors mapped from it stay valid (the mapping outlives the name).
`BytesFile` is a small file already in memory (a manifest).
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import IO

from ksuit.storage.backend import OpenedFile
from ksuit.storage.local.safe_files import hash_fd
from ksuit.storage.objectstore.stores import Store


class ObjectFile(OpenedFile):
    """One object of a store, named `name` (its logical file name) at `location` (its URL)."""

    def __init__(self, store: Store, path: str, name: str, location: str, size: int):
        self.store = store
        self.path = path
        self.name = name
        self.location = location
        self.size = size
        self._local: str | None = None
        self._fd = -1

    def read_at(self, offset: int, size: int) -> bytes:
        if self._fd >= 0:
            return os.pread(self._fd, size, offset)
        end = min(self.size, offset + size)
        return self.store.read_range(self.path, offset, end) if end > offset else b""

    def _materialize(self) -> int:
        if self._fd < 0:
            fd, local = tempfile.mkstemp(prefix="ksuit-object-", suffix=f"-{self.name[-80:]}")
            try:
                with os.fdopen(os.dup(fd), "wb") as out:
                    self.store.download(self.path, out, self.size)
                if os.fstat(fd).st_size != self.size:
                    raise OSError(
                        f"{self.location} changed while it was read ({os.fstat(fd).st_size} bytes instead of "
                        f"{self.size}); load it again"
                    )
            except BaseException:
                os.close(fd)
                os.unlink(local)
                raise
            self._fd, self._local = fd, local
        return self._fd

    def stream(self) -> IO[bytes]:
        return os.fdopen(os.dup(self._materialize()), "rb")

    def checksum(self) -> tuple[int, str]:
        return hash_fd(self._materialize())

    def local_path(self) -> str:
        self._materialize()
        assert self._local is not None
        return self._local

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._local is not None:
            try:
                os.unlink(self._local)
            except FileNotFoundError:
                pass
            self._local = None


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
