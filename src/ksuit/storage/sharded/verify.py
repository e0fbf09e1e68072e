"""Checking and describing a sharded checkpoint folder without loading its tensors.

`check_folder` is what `ksuit verify` adds to the checksums of the folder's parts: the skeleton
and `.metadata` read safely and name the same tensors, each tensor's chunks cover it exactly
(no gap, no overlap), and every chunk is a well-formed archive of a tensor of the chunk's shape
and dtype (its zip directory and pickle are read, never its data). `describe` is what
`ksuit inspect` shows: the payload's plain values and every tensor's shape, dtype and bytes,
from the skeleton and `.metadata` only (no part file is opened).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

from ksuit.storage.backend import Backend
from ksuit.storage.errors import CorruptCheckpointError, UnsafeCheckpointError
from ksuit.storage.sharded.load import read_folder_metadata
from ksuit.storage.sharded.payload import join_payload
from ksuit.storage.sharded.reader import SliceFile, open_part
from ksuit.storage.torch_archive import check_torch_archive

MAX_PROBLEMS = 20


def _chunk_problem(
    folder: Backend, key: str, item: TensorStorageMetadata, chunk: Any, info: Any
) -> str | None:
    with open_part(folder, info.relative_path) as f:
        piece = SliceFile(f, info.offset, info.length, f"a chunk of {key[:200]!r}")
        check_torch_archive(piece)
        with torch.serialization.skip_data(), piece.stream() as stream:
            meta = torch.load(stream, map_location="meta", weights_only=True)
    if not isinstance(meta, torch.Tensor):
        return f"{piece.location} holds a {type(meta).__name__}, not a tensor"
    if meta.dtype != item.properties.dtype or tuple(meta.shape) != tuple(chunk.sizes):
        return (
            f"{piece.location} holds a {meta.dtype} tensor of shape {tuple(meta.shape)} where the metadata "
            f"records {item.properties.dtype} {tuple(chunk.sizes)}"
        )
    return None


def check_folder(folder: Backend) -> list[str]:
    """What is wrong with the sharded checkpoint `folder` beyond its parts' checksums (see the
    module docstring); [] when nothing."""
    try:
        _, metadata = read_folder_metadata(folder)  # also: each tensor's chunks cover it exactly
    except (CorruptCheckpointError, UnsafeCheckpointError, OSError) as e:
        return [str(e).splitlines()[0]]
    problems: list[str] = []
    for key, item in metadata.state_dict_metadata.items():
        assert isinstance(item, TensorStorageMetadata)  # read_folder_metadata refuses the rest
        for chunk in item.chunks:
            info = metadata.storage_data[MetadataIndex(key, chunk.offsets)]
            try:
                problem = _chunk_problem(folder, key, item, chunk, info)
            except (CorruptCheckpointError, UnsafeCheckpointError, OSError) as e:
                problem = str(e).splitlines()[0]
            except Exception as e:  # what torch raises on an archive that passed the checks
                problem = f"a chunk of {key[:200]!r} cannot be read: {type(e).__name__}: {str(e)[:200]}"
            if problem:
                problems.append(problem)
        if len(problems) >= MAX_PROBLEMS:
            break
    return problems[:MAX_PROBLEMS]


def describe(folder: Backend) -> dict[str, Any]:
    """The payload of the folder with every tensor as `{shape, dtype, nbytes}`, plus `sharded`:
    the world size that wrote it and its parts."""
    skeleton, metadata = read_folder_metadata(folder)
    tensors = {}
    for key, item in metadata.state_dict_metadata.items():
        assert isinstance(item, TensorStorageMetadata)
        tensors[key] = {
            "shape": list(item.size),
            "dtype": str(item.properties.dtype).removeprefix("torch."),
            "nbytes": item.size.numel() * item.properties.dtype.itemsize,
        }
    payload: dict[str, Any] = join_payload(skeleton["payload"], skeleton["tensors"], tensors)  # type: ignore[arg-type]
    parts = sorted({info.relative_path for info in metadata.storage_data.values()})
    payload["sharded"] = {"world_size": skeleton.get("world_size"), "parts": parts}
    return payload
