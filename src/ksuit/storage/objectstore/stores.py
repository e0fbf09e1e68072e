"""The few operations the object-store backend needs of a store, and any fsspec file system
behind them.

Paths are the file system's own (`bucket/key` for S3, `/a/b` for `memory://`). `Store.put`
takes the conditions of the commit protocol (`create_only`: `If-None-Match: *`; `if_match`: an
ETag), raising `PreconditionFailed` when they do not hold. `FsspecStore` serves any fsspec file
system: it has no conditional writes, so it checks the conditions itself under a lock of this
process (exact for `memory://`, whose data lives in this process; elsewhere a single-writer
guarantee, see `ksuit.storage.objectstore`). `ksuit.storage.objectstore.s3.S3Store` is S3.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any

import xxhash

from ksuit.storage.objectstore.streams import UploadStream


@dataclass(frozen=True)
class Fetched:
    """What a read of a small object found: its bytes (None: no such object), its ETag, the
    store's clock at the answer (seconds since the epoch), and whether it was unchanged since
    the ETag the caller gave (`not_modified`; `data` is None then)."""

    data: bytes | None
    etag: str | None
    server_time: float
    not_modified: bool = False


@dataclass(frozen=True)
class Stored:
    """What a write answered: the new object's ETag and the store's clock."""

    etag: str
    server_time: float


@dataclass(frozen=True)
class Listed:
    """An object found by `list`: its path and size."""

    path: str
    size: int


@dataclass(frozen=True)
class Upload:
    """An unfinished multipart upload."""

    path: str
    upload_id: str


class PreconditionFailed(Exception):
    """A conditional write found its condition false (HTTP 412). The write may be the caller's
    own, sent before and landed with its answer lost: HTTP clients retry too (`retried` only
    says whether ksuit did), so a caller that can tell checks what is there."""

    def __init__(self, path: str, retried: bool = False):
        super().__init__(f"precondition failed for {path}")
        self.path = path
        self.retried = retried


class TooLarge(Exception):
    """An object is larger than the caller allows."""

    def __init__(self, path: str, size: int):
        super().__init__(f"{path} is larger than allowed ({size} bytes or more)")
        self.path = path
        self.size = size


class Store(ABC):
    """One file system (a bucket's store, the memory store) with the backend's operations."""

    protocol: str
    conditional_writes: bool  # the store itself enforces If-None-Match / If-Match

    def url(self, path: str) -> str:
        return f"{self.protocol}://{path.lstrip('/')}"

    @abstractmethod
    def get(self, path: str, max_bytes: int, if_none_match: str | None = None) -> Fetched:
        """A small object's bytes; `TooLarge` when it has more than `max_bytes`."""

    def get_many(self, paths: Sequence[str], max_bytes: int) -> dict[str, bytes | None]:
        """Several small objects (None for a missing one)."""
        return {p: self.get(p, max_bytes).data for p in paths}

    @abstractmethod
    def put(
        self, path: str, data: bytes, *, create_only: bool = False, if_match: str | None = None
    ) -> Stored:
        """Writes a small object whole, if the condition holds (`PreconditionFailed` if not)."""

    @abstractmethod
    def size(self, path: str) -> int | None:
        """The size of an object, or None when there is none."""

    @abstractmethod
    def read_range(self, path: str, start: int, end: int) -> bytes:
        """Bytes `[start, end)` of an object (fewer at its end)."""

    @abstractmethod
    def download(self, path: str, out: IO[bytes], size: int) -> str | None:
        """Writes the whole object (of `size` bytes) into the file `out`, from its position;
        returns the xxh3-64 hex digest of the bytes when it could hash them on the way."""

    @abstractmethod
    def open_write(self, path: str, expected_nbytes: int) -> UploadStream:
        """A stream whose `finish()` makes the object `path` exist whole."""

    @abstractmethod
    def list_folder(self, prefix: str, recursive: bool = False) -> tuple[list[Listed], list[str]]:
        """Objects directly under the folder `prefix` (every one below it when `recursive`) and,
        when not recursive, the names of its subfolders. Nothing there: two empty lists."""

    @abstractmethod
    def delete(self, paths: Sequence[str]) -> None:
        """Removes objects (missing ones are skipped)."""

    def list_uploads(self, prefix: str) -> list[Upload]:
        """Unfinished multipart uploads of objects under `prefix`."""
        return []

    def abort_upload(self, upload: Upload) -> None:  # noqa: B027 - no uploads: nothing to abandon
        """Abandons an unfinished multipart upload (its parts are freed)."""

    def now(self) -> float:
        """The store's clock (seconds since the epoch)."""
        return time.time()


def etag_of(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


_EMULATION_LOCK = threading.Lock()


def write_object(
    store: Store,
    path: str,
    write: Callable[[UploadStream], None],
    expected_nbytes: int,
    opened: Callable[[UploadStream], None] | None = None,
) -> tuple[UploadStream, float]:
    """Streams `write` into the object `path`, hashed on the way: the object exists whole when
    this returns, and not at all (the upload aborted) when `write` raises. `opened` sees the
    stream before anything is written (a caller that must abort it from elsewhere). Returns the
    finished stream (its `nbytes`, `hexdigest()`) and the seconds taken."""
    start = time.perf_counter()
    stream = store.open_write(path, expected_nbytes)
    if opened is not None:
        opened(stream)
    try:
        write(stream)
    except BaseException:
        stream.abort()
        raise
    stream.finish()
    return stream, time.perf_counter() - start


class FsspecStore(Store):
    """Any fsspec file system; conditional writes are checked under a lock of this process."""

    conditional_writes = False

    def __init__(self, fs: Any, protocol: str):
        self.fs = fs
        self.protocol = protocol

    def __repr__(self) -> str:
        return f"FsspecStore({self.protocol}://)"

    def get(self, path: str, max_bytes: int, if_none_match: str | None = None) -> Fetched:
        now = time.time()
        try:
            size = self.fs.size(path)
            if size is not None and size > max_bytes:
                raise TooLarge(path, size)
            data = self.fs.cat_file(path)
        except (FileNotFoundError, IsADirectoryError):
            return Fetched(None, None, now)
        if len(data) > max_bytes:
            raise TooLarge(path, len(data))
        etag = etag_of(data)
        if if_none_match is not None and etag == if_none_match:
            return Fetched(None, etag, now, not_modified=True)
        return Fetched(bytes(data), etag, now)

    def put(
        self, path: str, data: bytes, *, create_only: bool = False, if_match: str | None = None
    ) -> Stored:
        with _EMULATION_LOCK:
            if create_only or if_match is not None:
                try:
                    current: bytes | None = self.fs.cat_file(path)
                except FileNotFoundError:
                    current = None
                if create_only and current is not None:
                    raise PreconditionFailed(path)
                if if_match is not None and (current is None or etag_of(current) != if_match):
                    raise PreconditionFailed(path)
            self.fs.pipe_file(path, bytes(data))
        return Stored(etag_of(data), time.time())

    def size(self, path: str) -> int | None:
        try:
            info = self.fs.info(path)
        except FileNotFoundError:
            return None
        return int(info["size"]) if info.get("type") == "file" else None

    def read_range(self, path: str, start: int, end: int) -> bytes:
        return bytes(self.fs.cat_file(path, start=start, end=end))

    def download(self, path: str, out: IO[bytes], size: int) -> str | None:
        digest = xxhash.xxh3_64()
        with self.fs.open(path, "rb") as f:
            while chunk := f.read(16 << 20):
                out.write(chunk)
                digest.update(chunk)
        return digest.hexdigest()

    def open_write(self, path: str, expected_nbytes: int) -> UploadStream:
        return _FileUpload(self, path)

    def list_folder(self, prefix: str, recursive: bool = False) -> tuple[list[Listed], list[str]]:
        try:
            if recursive:
                found = self.fs.find(prefix, detail=True)
                return [Listed(p, int(i["size"])) for p, i in sorted(found.items())], []
            entries = self.fs.ls(prefix, detail=True)
        except FileNotFoundError:
            return [], []
        files = [Listed(e["name"], int(e["size"])) for e in entries if e.get("type") == "file"]
        folders = [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory"]
        return sorted(files, key=lambda f: f.path), sorted(folders)

    def delete(self, paths: Sequence[str]) -> None:
        for path in paths:
            try:
                self.fs.rm_file(path)
            except FileNotFoundError:
                continue


class _FileUpload(UploadStream):
    """An fsspec file opened for writing; the object appears when it is closed."""

    def __init__(self, store: FsspecStore, path: str):
        super().__init__(store.url(path))
        self.store = store
        self.path = path
        self.file = store.fs.open(path, "wb")

    def _send(self, view: memoryview) -> None:
        self.file.write(view)

    def _finish(self) -> None:
        self.file.close()

    def _abort(self) -> None:
        try:
            discard = getattr(self.file, "discard", None)
            if callable(discard):
                discard()
            else:
                self.file.close()
        finally:
            self.store.delete([self.path])


__all__ = [
    "Fetched",
    "FsspecStore",
    "Listed",
    "PreconditionFailed",
    "Store",
    "Stored",
    "TooLarge",
    "Upload",
    "etag_of",
]
