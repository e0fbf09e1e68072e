"""`BackendStorageReader`: a torch.distributed.checkpoint `StorageReader` over a ksuit backend
that trusts nothing it reads.

`.metadata` is read through the allowlisting unpickler (`ksuit.storage.sharded.metadata`), never
`pickle.load`; each chunk is a `torch.save` archive inside a part file, read by range and
checked like any `.th` file (`ksuit.storage.torch_archive`: zip directory, allowlisted
`data.pkl`, sizes) before `torch.load(weights_only=True)` sees it; a chunk must hold a tensor of
the shape and dtype the metadata records. Part files are opened once per read and only as
regular files of the folder (`open_part`: on an object store, fetched whole once, not in many
small ranges).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from typing import IO, Any, cast

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from ksuit.storage.backend import Backend, OpenedFile
from ksuit.storage.errors import CorruptCheckpointError, UnsafeCheckpointError
from ksuit.storage.loading import load_opened
from ksuit.storage.sharded.metadata import read_dcp_metadata


class _Window(io.RawIOBase):
    """A seekable read-only stream over `length` bytes of an opened file from `offset`."""

    def __init__(self, f: OpenedFile, offset: int, length: int):
        self.f, self.offset, self.length, self.pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.length}[whence]
        self.pos = max(0, base + pos)
        return self.pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(view.nbytes, self.length - self.pos))
        if n == 0:
            return 0
        data = self.f.read_at(self.offset + self.pos, n)
        view[: len(data)] = data
        self.pos += len(data)
        return len(data)


class SliceFile(OpenedFile):
    """A byte range of an opened file, as a file of its own (a chunk archive in a part file)."""

    def __init__(self, f: OpenedFile, offset: int, length: int, what: str):
        if offset < 0 or length < 0 or offset + length > f.size:
            raise CorruptCheckpointError(f"{what} lies outside {f.location} ({f.size} bytes)")
        self.parent, self.offset, self.size = f, offset, length
        self.name = f.name
        self.location = f"{f.location} [{what}, bytes {offset}..{offset + length}]"

    def read_at(self, offset: int, size: int) -> bytes:
        size = max(0, min(size, self.size - offset))
        return self.parent.read_at(self.offset + offset, size) if size else b""

    def stream(self) -> IO[bytes]:
        return cast(IO[bytes], io.BufferedReader(_Window(self.parent, self.offset, self.size)))

    def checksum(self) -> tuple[int, str]:
        raise NotImplementedError("a slice of a part file has no checksum of its own")

    def local_path(self) -> str | None:
        return None

    def close(self) -> None:
        pass


def open_part(folder: Backend, name: str) -> OpenedFile:
    """The part `name` of `folder`, opened for many chunk reads. A part in an object store is
    fetched whole first (into a temporary file, shared through the download cache that
    checksumming it filled) rather than in many small range requests; a local file is read in
    place."""
    f = folder.open(name)
    try:
        f.local_path()
    except BaseException:
        f.close()
        raise
    return f


def load_chunk(
    f: OpenedFile, info: _StorageInfo, fqn: str, expected: TensorStorageMetadata | None
) -> torch.Tensor:
    """The chunk tensor stored at `info` in the opened part `f`, checked before it is loaded."""
    piece = SliceFile(f, info.offset, info.length, f"a chunk of {fqn[:200]!r}")
    tensor = load_opened(piece, map_location="cpu")
    if not isinstance(tensor, torch.Tensor):
        raise UnsafeCheckpointError(
            f"refusing {piece.location}: it holds a {type(tensor).__name__}, not a tensor"
        )
    if expected is not None and tensor.dtype != expected.properties.dtype:
        raise CorruptCheckpointError(
            f"{piece.location} holds a {tensor.dtype} tensor where the metadata records "
            f"{expected.properties.dtype}"
        )
    return tensor


class BackendStorageReader(StorageReader):
    """Reads a committed sharded checkpoint folder (see the module docstring)."""

    def __init__(self, folder: Backend, part_sizes: dict[str, int] | None = None):
        super().__init__()
        self.folder = folder
        self.part_sizes = part_sizes
        self._metadata: Metadata | None = None
        self.storage_data: dict[MetadataIndex, _StorageInfo] = {}

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self.storage_data = {}

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is None:
            self._metadata = read_dcp_metadata(self.folder, self.part_sizes)
        if self._metadata.storage_meta is None:
            self._metadata.storage_meta = StorageMeta()
        return self._metadata

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        metadata = self.read_metadata()
        by_part: dict[str, list[Any]] = {}
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                raise UnsafeCheckpointError(
                    f"refusing to read the non-tensor item {item.storage_index.fqn!r}"
                )
            by_part.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for part, items in by_part.items():
            with open_part(self.folder, part) as f:
                for item in sorted(items, key=lambda i: self.storage_data[i.storage_index].offset):
                    fqn = item.storage_index.fqn
                    item_md = metadata.state_dict_metadata.get(fqn)
                    expected = item_md if isinstance(item_md, TensorStorageMetadata) else None
                    tensor = load_chunk(f, self.storage_data[item.storage_index], fqn, expected)
                    tensor = narrow_tensor_by_index(tensor, item.storage_offsets, item.lengths)
                    target = planner.resolve_tensor(item).detach()
                    if target.size() != tensor.size():
                        raise CorruptCheckpointError(
                            f"a chunk of {fqn[:200]!r} in {f.location} has shape {tuple(tensor.shape)} where "
                            f"{tuple(target.shape)} was expected"
                        )
                    target.copy_(tensor)
                    planner.commit_tensor(item, target)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False


def iter_parts(metadata: Metadata) -> Iterator[str]:
    """The part files the metadata's chunks live in."""
    yield from sorted({info.relative_path for info in metadata.storage_data.values()})
