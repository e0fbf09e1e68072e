"""Reading the `.metadata` of a sharded checkpoint (torch.distributed.checkpoint's pickle) safely.

DCP's own reader unpickles `.metadata` with plain `pickle.load`: a crafted file runs code. ksuit
reads it through `ksuit.storage.safe_pickle`: the pickle is first scanned without running it
against `DCP_POLICY`, an allowlist of exactly what DCP writes (its metadata dataclasses, the
`_StorageInfo` of its file system writer, `torch.Size`, dtypes, layouts, a `PosixPath` of path
parts, plain values), each call with checked arguments; anything else is refused, naming the
file. The result is then checked field by field (`check_metadata`): every tensor's size,
dtype and chunks, every chunk's place in a part file, and no non-tensor (pickled bytes) item
at all, since ksuit never puts any into DCP (plain values live in the weights-only `ksuit.th`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)

from ksuit.layout import is_part_filename
from ksuit.storage.backend import Backend
from ksuit.storage.errors import CorruptCheckpointError, UnsafeCheckpointError
from ksuit.storage.safe_pickle import GlobalRule, PicklePolicy, is_int, restricted_loads
from ksuit.storage.torch_archive import DTYPES, _check_size

METADATA_NAME = ".metadata"
MAX_METADATA_BYTES = 64 << 20
MAX_DIMS = 64
HINT = (
    "; ksuit reads only the metadata torch.distributed.checkpoint writes for tensors (no other "
    "objects). If you wrote this checkpoint yourself and trust it, load it with "
    "torch.distributed.checkpoint directly"
)
_DCP = "torch.distributed.checkpoint.metadata."
_LAYOUTS = ("torch.strided", "torch.sparse_coo", "torch.sparse_csr", "torch._mkldnn")


def _check_encoding(args: tuple[Any, ...]) -> str | None:
    ok = len(args) == 1 and is_int(args[0]) and 0 <= args[0] <= 2
    return None if ok else "an argument that is not a memory format code (0, 1 or 2)"


def _check_layout(args: tuple[Any, ...]) -> str | None:
    ok = len(args) == 1 and isinstance(args[0], str) and args[0] in _LAYOUTS
    return None if ok else "an argument that is not the name of a tensor layout"


def _check_path(args: tuple[Any, ...]) -> str | None:
    ok = len(args) <= 64 and all(isinstance(a, str) and len(a) <= 4096 for a in args)
    return None if ok else "arguments that are not path parts"


def _dcp_globals() -> dict[str, GlobalRule]:
    dataclass_rule = GlobalRule(new=True, build=True)
    rules = {name: GlobalRule() for name in DTYPES}  # dtypes are referred to, never called
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "TensorProperties",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
    ):
        rules[_DCP + name] = dataclass_rule
    rules["torch.distributed.checkpoint.filesystem._StorageInfo"] = dataclass_rule
    rules[_DCP + "_MEM_FORMAT_ENCODING"] = GlobalRule(call=True, leaf=True, check_args=_check_encoding)
    rules["torch.serialization._get_layout"] = GlobalRule(call=True, leaf=True, check_args=_check_layout)
    rules["torch.Size"] = GlobalRule(call=True, check_args=_check_size)
    # DCP's own file system writer records its folder as a path in `storage_meta.checkpoint_id`
    rules["pathlib.PosixPath"] = GlobalRule(call=True, leaf=True, check_args=_check_path)
    return rules


DCP_POLICY = PicklePolicy(globals=_dcp_globals(), max_bytes=MAX_METADATA_BYTES, hint=HINT)


def _bad(source: str, problem: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"cannot read {source}: {problem}; the sharded checkpoint is damaged: run `ksuit verify` on the "
        "run and resume from another checkpoint"
    )


def _dims(value: Any, what: str, source: str) -> tuple[int, ...]:
    if (
        not isinstance(value, torch.Size)
        or len(value) > MAX_DIMS
        or not all(is_int(d) and d >= 0 for d in value)
    ):
        raise _bad(source, f"{what} is not a size of at most {MAX_DIMS} dimensions")
    return tuple(value)


def check_metadata(metadata: Any, source: str, part_sizes: dict[str, int] | None = None) -> Metadata:
    """`metadata` if it is DCP metadata of tensors only, every chunk inside its tensor and
    inside a part file of the folder (`part_sizes`: `{part: bytes}`, when known); else
    `CorruptCheckpointError` (or `UnsafeCheckpointError` for a non-tensor item), naming
    `source`."""
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise _bad(source, "it is not torch.distributed.checkpoint metadata")
    storage = metadata.storage_data
    if not isinstance(storage, dict):
        raise _bad(source, "it has no storage locations")
    for index, info in storage.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            raise _bad(source, "a storage location is not a (MetadataIndex, _StorageInfo) pair")
        if not isinstance(index.fqn, str) or (
            index.offset is not None and not isinstance(index.offset, torch.Size)
        ):
            raise _bad(source, "a storage location names no tensor")
        if not (is_part_filename(info.relative_path) and is_int(info.offset) and is_int(info.length)):
            raise _bad(source, f"the storage of {str(index.fqn)[:200]!r} is not a (part, offset, length)")
        if info.offset < 0 or info.length < 0 or getattr(info, "transform_descriptors", None):
            raise _bad(source, f"the storage of {index.fqn[:200]!r} has a negative range or transforms")
        if part_sizes is not None:
            size = part_sizes.get(info.relative_path)
            if size is None or info.offset + info.length > size:
                raise _bad(
                    source,
                    f"the storage of {index.fqn[:200]!r} lies outside the part {info.relative_path!r}",
                )
    for fqn, item in metadata.state_dict_metadata.items():
        if not isinstance(fqn, str):
            raise _bad(source, "an item name is not a str")
        if isinstance(item, BytesStorageMetadata):
            raise UnsafeCheckpointError(
                f"refusing to load {source}: it holds the non-tensor item {fqn[:200]!r}, pickled bytes that "
                f"ksuit never writes into a sharded checkpoint (plain values live in ksuit.th){HINT}"
            )
        if not isinstance(item, TensorStorageMetadata):
            raise _bad(source, f"the item {fqn[:200]!r} is not a tensor")
        _check_tensor(fqn, item, storage, source)
    return metadata


def _check_tensor(fqn: str, item: TensorStorageMetadata, storage: dict[Any, Any], source: str) -> None:
    where = f"tensor {fqn[:200]!r}"
    size = _dims(item.size, f"the size of {where}", source)
    dtype = getattr(item.properties, "dtype", None)
    if not isinstance(dtype, torch.dtype) or getattr(item.properties, "layout", None) != torch.strided:
        raise _bad(source, f"{where} has no dense dtype")
    if not isinstance(item.chunks, list):
        raise _bad(source, f"{where} has no list of chunks")
    for chunk in item.chunks:
        if not isinstance(chunk, ChunkStorageMetadata):
            raise _bad(source, f"{where} has a chunk that is not a ChunkStorageMetadata")
        offsets = _dims(chunk.offsets, f"a chunk offset of {where}", source)
        sizes = _dims(chunk.sizes, f"a chunk size of {where}", source)
        if len(offsets) != len(size) or len(sizes) != len(size):
            raise _bad(source, f"a chunk of {where} has another number of dimensions than the tensor")
        if any(o + s > d for o, s, d in zip(offsets, sizes, size, strict=True)):
            raise _bad(source, f"a chunk of {where} reaches past the tensor")
        if MetadataIndex(fqn, chunk.offsets) not in storage:
            raise _bad(source, f"a chunk of {where} at {list(offsets)} is stored nowhere")


def chunk_problems(fqn: str, item: TensorStorageMetadata) -> list[str]:
    """What keeps the chunks of a (checked) tensor from covering it exactly: overlaps, gaps.

    Chunks lie inside the tensor (`check_metadata`), so they cover it exactly when none overlaps
    another and their sizes add up to the tensor's. Overlaps are found by a sweep over the first
    dimension, so the usual layouts (blocks of rows) cost a sort."""
    size = tuple(item.size)
    boxes = sorted(
        ((tuple(c.offsets), tuple(c.sizes)) for c in item.chunks if math.prod(c.sizes)),
        key=lambda box: box[0][:1],
    )
    for i, (off_a, size_a) in enumerate(boxes):
        for off_b, size_b in boxes[i + 1 :]:
            if size and off_b[0] >= off_a[0] + size_a[0]:
                break  # sorted by the first offset: no later box reaches back into this one
            if all(
                max(a, b) < min(a + sa, b + sb)
                for a, sa, b, sb in zip(off_a, size_a, off_b, size_b, strict=True)
            ):
                return [f"tensor {fqn[:200]!r}: its chunks at {list(off_a)} and {list(off_b)} overlap"]
    covered = sum(math.prod(box[1]) for box in boxes)
    total = math.prod(size)
    if covered != total:
        return [f"tensor {fqn[:200]!r}: its chunks hold {covered} of its {total} elements"]
    return []


def read_dcp_metadata(folder: Backend, part_sizes: dict[str, int] | None = None) -> Metadata:
    """The checked metadata of the sharded checkpoint folder `folder` (see the module docstring).

    Raises `UnsafeCheckpointError` (a pickle that would run or build anything else, a non-tensor
    item) or `CorruptCheckpointError`, both naming the file; FileNotFoundError when missing."""
    source = folder.file_location(METADATA_NAME)
    try:
        data = folder.read_small(METADATA_NAME, MAX_METADATA_BYTES, "sharded checkpoint metadata")
    except UnsafeCheckpointError:
        raise
    metadata = restricted_loads(data, DCP_POLICY, source)
    return check_metadata(metadata, source, part_sizes)
