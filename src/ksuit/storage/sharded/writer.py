"""`BackendStorageWriter`: a torch.distributed.checkpoint `StorageWriter` that writes each
rank's shards through a ksuit storage backend, into folders staged by the coordinator.

One DCP save writes every sharded folder of a set (one planning round for all of them): the
state dict's keys are `<folder index>/<key>`. Every rank writes, per folder, one part file
`__<rank>_0.distcp` (DCP's own layout: each tensor chunk a `torch.save` archive at a recorded
offset) through `Backend.write_part`, so its bytes are hashed while written and durable
(fsynced) when `write_data` returns. The write results each rank returns carry its parts'
names, sizes and checksums to the coordinator (DCP gathers them before `finish`); the
coordinator's `finish` splits DCP's metadata by folder, writes each folder's `.metadata` (what
plain DCP reads) the same way, and keeps every folder's parts in `parts`, which the caller adds
to its set. Nothing is visible to readers until the set commits: `finish` is not a commit point
here (it is in DCP's own writer).

Non-tensor items are refused: ksuit keeps plain values out of DCP's pickled bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pickle
import uuid
from typing import Any, cast

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
_PART_MARK = "\0ksuit-part\0"  # the fqn of a write result that carries a part file


def folder_key(index: int, key: str) -> str:
    """The key of `key` of the folder `index` in the one DCP save of a set."""
    return f"{index}/{key}"


def split_key(fqn: str) -> tuple[int, str]:
    index, _, key = fqn.partition("/")
    return int(index), key


@dataclasses.dataclass(frozen=True)
class _Prefix:
    prefix: str


def _write_all(data: bytes, out: WriteStream) -> None:
    out.write(data)


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


def _folder_metadata(
    metadata: Metadata, index: int, storage: dict[MetadataIndex, Any], save_id: str
) -> Metadata:
    """The metadata of one folder: its items, under their own keys."""
    items = {}
    for fqn, item in metadata.state_dict_metadata.items():
        i, key = split_key(fqn)
        if i == index:
            items[key] = item
    locations = {}
    for where, info in storage.items():
        i, key = split_key(where.fqn)
        if i == index:
            locations[MetadataIndex(key, where.offset)] = info
    return Metadata(
        state_dict_metadata=items,
        planner_data={key: (key,) for key in items},
        storage_data=locations,
        storage_meta=StorageMeta(checkpoint_id=None, save_id=save_id),
        version=DCP_VERSION,
    )


class BackendStorageWriter(StorageWriter):
    """Writes the parts of the staged sharded checkpoint folders of one set (see the module
    docstring); `folders[i]` receives the keys `<i>/...`."""

    def __init__(self, backend: Backend, folders: list[StagedFolder]):
        super().__init__()
        self.backend = backend
        self.folders = folders
        self.rank = 0
        self.is_coordinator = False
        self.save_id = str(uuid.uuid4())
        self.parts: dict[str, list[WrittenFile]] = {}  # {folder: every rank's parts}, on the coordinator

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self.save_id = str(uuid.uuid4())
        self.parts = {}

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
        by_folder: dict[int, list[WriteItem]] = {}
        for item in plan.items:
            by_folder.setdefault(split_key(item.index.fqn)[0], []).append(item)
        name = f"{cast(_Prefix, plan.storage_data).prefix}0.distcp"
        for index, items in sorted(by_folder.items()):
            items.sort(key=lambda i: (i.index.fqn, tuple(i.index.offset or ())))

            def write(out: WriteStream, items: list[WriteItem] = items) -> None:
                for item in items:
                    tensor = _chunk_tensor(planner, item)
                    offset = out.tell()
                    torch_save(tensor, out)
                    length = out.tell() - offset
                    results.append(WriteResult(item.index, length, _StorageInfo(name, offset, length)))
                    del tensor

            part = self.backend.write_part(self.folders[index], name, write, sum(map(_item_nbytes, items)))
            results.append(WriteResult(MetadataIndex(f"{_PART_MARK}{index}"), part.size, part))
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        storage: dict[MetadataIndex, Any] = {}
        parts: dict[str, list[WrittenFile]] = {f.name: [] for f in self.folders}
        for rank_results in results:
            for result in rank_results:
                if result.index.fqn.startswith(_PART_MARK):
                    folder = self.folders[int(result.index.fqn[len(_PART_MARK) :])]
                    parts[folder.name].append(cast(WrittenFile, result.storage_data))
                else:
                    storage[result.index] = result.storage_data
        for index, folder in enumerate(self.folders):
            data = pickle.dumps(_folder_metadata(metadata, index, storage, self.save_id))
            written = self.backend.write_part(
                folder, METADATA_NAME, functools.partial(_write_all, data), len(data)
            )
            parts[folder.name].append(written)
        self.parts = parts

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=None, save_id=self.save_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False  # chosen explicitly, never inferred from a checkpoint id
