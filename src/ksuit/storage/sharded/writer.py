"""`BackendStorageWriter`: a torch.distributed.checkpoint `StorageWriter` that writes each
rank's shards through a ksuit storage backend, into a folder staged by the coordinator.

Every rank writes one part file `__<rank>_0.distcp` (DCP's own layout: each tensor chunk a
`torch.save` archive at a recorded offset) through `Backend.write_part`, so its bytes are hashed
while written and durable (fsynced) when `write_data` returns. The write results each rank
returns carry the part's name, size and checksum to the coordinator (DCP gathers them before
`finish`); the coordinator's `finish` writes `.metadata` the same way and keeps every part of
the folder in `parts`, which the caller adds to its set. Nothing is visible to readers until
the set commits: `finish` is not a commit point here (it is in DCP's own writer).

Non-tensor items are refused: ksuit keeps plain values out of DCP's pickled bytes.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import uuid
from typing import IO, Any, cast

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from ksuit.storage.backend import Backend, StagedFolder, WriteStream, WrittenFile
from ksuit.storage.formats import torch_save
from ksuit.storage.sharded.metadata import METADATA_NAME

DCP_VERSION = "1.0.0"  # the format version DCP's file system writer stamps (CURRENT_DCP_VERSION)
_PART_MARK = "\0ksuit-part\0"  # the fqn of the write result that carries a part file


@dataclasses.dataclass(frozen=True)
class _Prefix:
    prefix: str


def _item_nbytes(item: WriteItem) -> int:
    size = item.tensor_storage_size()
    return size if size is not None else 0


def _chunk_tensor(planner: SavePlanner, item: WriteItem) -> torch.Tensor:
    tensor = cast(torch.Tensor, planner.resolve_data(item)).detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()  # only the chunk's own bytes, as DCP's writer does
    return tensor


class BackendStorageWriter(StorageWriter):
    """Writes the parts of one staged sharded checkpoint folder (see the module docstring)."""

    def __init__(self, backend: Backend, staged: StagedFolder):
        super().__init__()
        self.backend = backend
        self.staged = staged
        self.rank = 0
        self.is_coordinator = False
        self.save_id = str(uuid.uuid4())
        self.parts: list[WrittenFile] = []  # every rank's parts and .metadata, on the coordinator

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self.save_id = str(uuid.uuid4())
        self.parts = []

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank") or 0)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                raise TypeError(
                    f"{item.index.fqn!r} is not a tensor; ksuit keeps plain values out of DCP (they "
                    "belong in the payload's skeleton)"
                )
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return [dataclasses.replace(plan, storage_data=_Prefix(f"__{i}_")) for i, plan in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        results: list[WriteResult] = []
        future: Future[list[WriteResult]] = Future()
        if plan.items:
            name = f"{cast(_Prefix, plan.storage_data).prefix}0.distcp"
            items = sorted(plan.items, key=lambda i: (i.index.fqn, tuple(i.index.offset or ())))

            def write(out: WriteStream) -> None:
                for item in items:
                    tensor = _chunk_tensor(planner, item)
                    offset = out.tell()
                    torch_save(tensor, out)
                    length = out.tell() - offset
                    results.append(WriteResult(item.index, length, _StorageInfo(name, offset, length)))
                    del tensor

            part = self.backend.write_part(self.staged, name, write, sum(map(_item_nbytes, items)))
            results.append(WriteResult(MetadataIndex(_PART_MARK + name), part.size, part))
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        storage: dict[MetadataIndex, Any] = {}
        parts: list[WrittenFile] = []
        for rank_results in results:
            for result in rank_results:
                if result.index.fqn.startswith(_PART_MARK):
                    parts.append(cast(WrittenFile, result.storage_data))
                else:
                    storage[result.index] = result.storage_data
        metadata.version = DCP_VERSION
        metadata.storage_data = storage
        metadata.storage_meta = StorageMeta(checkpoint_id=None, save_id=self.save_id)
        data = pickle.dumps(metadata)
        parts.append(
            self.backend.write_part(self.staged, METADATA_NAME, lambda out: out.write(data), len(data))
        )
        self.parts = parts

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=None, save_id=self.save_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False  # chosen explicitly, never inferred from a checkpoint id


def pickled_size(obj: Any) -> int:
    """Bytes of `pickle.dumps(obj)` (for estimates)."""
    out = io.BytesIO()
    pickle.dump(obj, cast(IO[bytes], out))
    return out.tell()
