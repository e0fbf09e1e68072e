"""Reading a sharded checkpoint folder: its skeleton, its full tensors (one process, no process
group), or its tensors resharded into the shards of the calling ranks (DCP).

Every read goes through the checks of `ksuit.storage.sharded.metadata` (the `.metadata` pickle)
and `ksuit.storage.sharded.reader` (each chunk archive); `ksuit.th` is loaded with the one
safe loader (`weights_only=True`). The skeleton must name exactly the tensors the metadata
holds.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata

from ksuit.layout import is_part_filename
from ksuit.storage.backend import Backend
from ksuit.storage.errors import CorruptCheckpointError
from ksuit.storage.loading import load_opened
from ksuit.storage.sharded.metadata import chunk_problems, read_dcp_metadata
from ksuit.storage.sharded.payload import Path_, join_payload
from ksuit.storage.sharded.reader import BackendStorageReader, load_chunk, open_part
from ksuit.storage.sharded.save import SKELETON_FORMAT, SKELETON_NAME, SKELETON_VERSION, plain_errors


def _bad(folder: Backend, problem: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{folder.file_location(SKELETON_NAME)} {problem}; the sharded checkpoint {folder.location} is "
        "damaged: run `ksuit verify` on the run and resume from another checkpoint"
    )


def read_skeleton(folder: Backend) -> dict[str, Any]:
    """The checked content of the folder's `ksuit.th`: `{format, version, role, world_size,
    payload (without tensors), tensors ({key: path})}`."""
    with folder.open(SKELETON_NAME) as f:
        doc = load_opened(f)
    if not isinstance(doc, dict) or doc.get("format") != SKELETON_FORMAT:
        raise _bad(folder, "is not the skeleton of a ksuit sharded checkpoint")
    version = doc.get("version")
    if not isinstance(version, int) or version > SKELETON_VERSION:
        raise CorruptCheckpointError(
            f"{folder.file_location(SKELETON_NAME)} has version {version!r}; this ksuit reads up to "
            f"{SKELETON_VERSION}: upgrade ksuit"
        )
    paths = doc.get("tensors")
    if not isinstance(paths, dict) or not all(
        isinstance(k, str)
        and isinstance(p, list)
        and 0 < len(p) <= 64
        and all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in p)
        for k, p in paths.items()
    ):
        raise _bad(folder, "has no valid map of tensor paths")
    return doc


def part_sizes(folder: Backend) -> dict[str, int]:
    """`{part: bytes}` of the regular files of the folder with part names."""
    return {e.name: e.size for e in folder.entries() if e.problem is None and is_part_filename(e.name)}


def read_folder_metadata(folder: Backend) -> tuple[dict[str, Any], Metadata]:
    """`(skeleton, metadata)`, checked against each other."""
    skeleton = read_skeleton(folder)
    metadata = read_dcp_metadata(folder, part_sizes(folder))
    keys, stored = set(skeleton["tensors"]), set(metadata.state_dict_metadata)
    if keys != stored:
        extra = sorted(stored - keys)[:3] or sorted(keys - stored)[:3]
        raise _bad(folder, f"names other tensors than its .metadata holds (e.g. {extra})")
    for key, item in metadata.state_dict_metadata.items():
        assert isinstance(item, TensorStorageMetadata)  # read_dcp_metadata refuses the rest
        problems = chunk_problems(key, item)
        if problems:
            raise CorruptCheckpointError(
                f"{folder.file_location('.metadata')}: {problems[0]}; the sharded checkpoint is damaged: "
                "run `ksuit verify` on the run and resume from another checkpoint"
            )
    return skeleton, metadata


def iter_full_tensors(folder: Backend, metadata: Metadata) -> Iterator[tuple[str, torch.Tensor]]:
    """`(key, full tensor)` one at a time, each assembled on CPU from its chunks (memory: one
    tensor and one chunk at a time)."""
    for key, item in metadata.state_dict_metadata.items():
        assert isinstance(item, TensorStorageMetadata)  # read_dcp_metadata refuses anything else
        yield key, full_tensor(folder, metadata, key, item)


def full_tensor(folder: Backend, metadata: Metadata, key: str, item: TensorStorageMetadata) -> torch.Tensor:
    """One tensor of the folder, assembled from its chunks; refuses chunks that do not cover it."""
    result = torch.empty(tuple(item.size), dtype=item.properties.dtype)
    for chunk in item.chunks:
        info = metadata.storage_data[MetadataIndex(key, chunk.offsets)]
        with open_part(folder, info.relative_path) as f:
            data = load_chunk(f, info, key, item)
        if tuple(data.shape) != tuple(chunk.sizes):
            raise CorruptCheckpointError(
                f"a chunk of {key[:200]!r} in {folder.file_location(info.relative_path)} has shape "
                f"{tuple(data.shape)} where the metadata records {tuple(chunk.sizes)}"
            )
        view = result
        for dim, (offset, size) in enumerate(zip(chunk.offsets, chunk.sizes, strict=True)):
            view = view.narrow(dim, offset, size)
        view.copy_(data)
    return result  # read_folder_metadata checked that the chunks cover it exactly


def load_full(folder: Backend) -> Any:
    """The whole payload of a sharded checkpoint on CPU, in this process (no process group)."""
    skeleton, metadata = read_folder_metadata(folder)
    tensors = dict(iter_full_tensors(folder, metadata))
    return join_payload(skeleton["payload"], skeleton["tensors"], tensors)


TargetFn = Callable[[str, Path_, TensorStorageMetadata], torch.Tensor]


def load_resharded(folder: Backend, target: TargetFn, group: Any = None) -> Any:
    """The payload with every tensor read into `target(key, path, metadata)` (a DTensor shard of
    this rank, or a plain tensor for the whole): DCP reshards a save of any world size into the
    calling ranks' layout. A collective of `group` when torch.distributed is initialized."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    skeleton, metadata = read_folder_metadata(folder)
    targets: dict[str, torch.Tensor] = {}
    for key, path in skeleton["tensors"].items():
        item = metadata.state_dict_metadata[key]
        assert isinstance(item, TensorStorageMetadata)
        t = target(key, path, item)
        if tuple(t.shape) != tuple(item.size) or t.dtype != item.properties.dtype:
            raise ValueError(
                f"{folder.location}: {key!r} is a {item.properties.dtype} tensor of shape "
                f"{tuple(item.size)}, but the model has a {t.dtype} tensor of shape {tuple(t.shape)} "
                "there; resume with the model that wrote it"
            )
        targets[key] = t
    no_dist = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings(), plain_errors(group):
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(
            targets,
            storage_reader=BackendStorageReader(folder, part_sizes(folder)),
            planner=DefaultLoadPlanner(),
            process_group=group,
            no_dist=no_dist,
        )
    return join_payload(skeleton["payload"], skeleton["tensors"], targets)
