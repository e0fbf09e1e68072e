"""Consolidating a sharded checkpoint into one `.th` or `.safetensors` file, streaming tensor by
tensor: extra memory at most the largest tensor plus `PIECE_BYTES`, never the whole state.

Each full tensor's bytes are produced in row-major order from its chunks (`tensor_pieces`).
When the chunks are blocks of whole rows (FSDP's `Shard(0)`, and a replicated tensor's single
chunk) and each chunk archive stores its tensor contiguously (what DCP writes), the bytes are
copied from the part files in pieces of `PIECE_BYTES` and no tensor is ever held; otherwise the
tensor is assembled in memory once. Every chunk archive is checked like any `.th` file first
(`ksuit.storage.torch_archive`); the layout of its tensor is read without its data.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import Any, cast

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata
from typing_extensions import Buffer

from ksuit.storage.backend import Backend, OpenedFile, WriteStream, WrittenFile
from ksuit.storage.errors import CorruptCheckpointError
from ksuit.storage.formats import SAFETENSORS_DTYPES, SafetensorsFormat
from ksuit.storage.sharded.load import full_tensor, read_folder_metadata
from ksuit.storage.sharded.payload import join_payload
from ksuit.storage.sharded.reader import SliceFile, load_chunk, open_part
from ksuit.storage.torch_archive import check_torch_archive, read_zip_directory
from ksuit.storage.torch_stream import placeholder, write_streamed

SMALL_CHUNK = 1 << 20
PIECE_BYTES = 16 << 20  # plus the write stream's two 16 MiB buffers: under 64 MiB


def _raw_span(
    f: OpenedFile, info: _StorageInfo, fqn: str, item: TensorStorageMetadata, sizes: tuple[int, ...]
) -> tuple[int, int] | None:
    """`(offset in the part, bytes)` of a chunk's data when its archive stores exactly the chunk,
    contiguously (then its bytes can be copied as they are); None otherwise."""
    piece = SliceFile(f, info.offset, info.length, f"a chunk of {fqn[:200]!r}")
    check_torch_archive(piece)
    with torch.serialization.skip_data(), piece.stream() as stream:
        meta = torch.load(stream, map_location="meta", weights_only=True)
    itemsize = item.properties.dtype.itemsize
    nbytes = meta.numel() * itemsize if isinstance(meta, torch.Tensor) else -1
    if (
        not isinstance(meta, torch.Tensor)
        or meta.dtype != item.properties.dtype
        or tuple(meta.shape) != sizes
        or not meta.is_contiguous()
        or meta.storage_offset() != 0
        or meta.untyped_storage().nbytes() != nbytes
    ):
        return None
    data = [r for r in read_zip_directory(piece).values() if "/data/" in r.name]
    if len(data) != 1 or data[0].size != nbytes:
        return None
    header = piece.read_at(data[0].header_offset, 30)
    nlen, elen = struct.unpack_from("<HH", header, 26)
    start = data[0].header_offset + 30 + nlen + elen
    if start + nbytes > piece.size:
        raise CorruptCheckpointError(f"{piece.location}: its data record reaches past the chunk")
    return info.offset + start, nbytes


def _row_blocks(item: TensorStorageMetadata) -> list[Any] | None:
    """The chunks sorted by first row when they are blocks of whole rows tiling the tensor."""
    size = tuple(item.size)
    if not size:
        return list(item.chunks) if len(item.chunks) == 1 else None
    chunks = sorted(item.chunks, key=lambda c: c.offsets[0])
    row = 0
    for c in chunks:
        if tuple(c.offsets[1:]) != (0,) * (len(size) - 1) or tuple(c.sizes[1:]) != size[1:]:
            return None
        if c.offsets[0] != row:
            return None
        row += c.sizes[0]
    return chunks if row == size[0] else None


def _pieces_of(data: memoryview) -> Iterator[memoryview]:
    for begin in range(0, data.nbytes, PIECE_BYTES):
        yield data[begin : begin + PIECE_BYTES]


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(cast(Buffer, t.reshape(-1).view(torch.uint8).numpy())).cast("B")


class PartFiles:
    """The part files of a folder, each opened once while a consolidation reads its chunks."""

    def __init__(self, folder: Backend):
        self.folder = folder
        self.opened: dict[str, OpenedFile] = {}

    def __call__(self, name: str) -> OpenedFile:
        if name not in self.opened:
            self.opened[name] = open_part(self.folder, name)
        return self.opened[name]

    def close(self) -> None:
        for f in self.opened.values():
            f.close()
        self.opened.clear()


def tensor_pieces(
    folder: Backend, metadata: Metadata, key: str, parts: PartFiles | None = None
) -> Iterator[Buffer]:
    """The bytes of the full tensor `key`, row-major, in pieces (see the module docstring)."""
    item = metadata.state_dict_metadata[key]
    assert isinstance(item, TensorStorageMetadata)  # and its chunks cover it: read_folder_metadata
    blocks = _row_blocks(item)
    if blocks is None:
        yield from _pieces_of(_tensor_bytes(full_tensor(folder, metadata, key, item)))
        return
    own = parts is None
    parts = parts or PartFiles(folder)
    try:
        for chunk in blocks:
            info = metadata.storage_data[MetadataIndex(key, chunk.offsets)]
            f = parts(info.relative_path)
            # small chunks are loaded whole (one parse of their archive); large ones copied raw
            span = _raw_span(f, info, key, item, tuple(chunk.sizes)) if info.length >= SMALL_CHUNK else None
            if span is None:
                yield from _pieces_of(_tensor_bytes(load_chunk(f, info, key, item)))
                continue
            start, nbytes = span
            for begin in range(0, nbytes, PIECE_BYTES):
                data = f.read_at(start + begin, min(PIECE_BYTES, nbytes - begin))
                if len(data) != min(PIECE_BYTES, nbytes - begin):
                    raise CorruptCheckpointError(f"{f.location} ends inside a chunk of {key[:200]!r}")
                yield data
    finally:
        if own:
            parts.close()


def _placeholders(metadata: Metadata) -> dict[str, torch.Tensor]:
    tensors = {}
    for key, item in metadata.state_dict_metadata.items():
        assert isinstance(item, TensorStorageMetadata)
        tensors[key] = placeholder(tuple(item.size), item.properties.dtype)
    return tensors


def write_torch(
    folder: Backend, out: WriteStream, checked: tuple[dict[str, Any], Metadata] | None = None
) -> None:
    """The sharded checkpoint as one `.th` file (the payload it replaces), streamed."""
    skeleton, metadata = checked or read_folder_metadata(folder)
    tensors = _placeholders(metadata)
    key_of = {t.untyped_storage()._cdata: k for k, t in tensors.items()}
    payload = join_payload(skeleton["payload"], skeleton["tensors"], tensors)
    parts = PartFiles(folder)
    try:
        write_streamed(
            payload, lambda t: tensor_pieces(folder, metadata, key_of[t.untyped_storage()._cdata], parts), out
        )
    finally:
        parts.close()


def safetensors_layout(folder: Backend) -> tuple[bytes, list[str], Metadata]:
    """`(header, tensor keys in file order, metadata)` of the safetensors file of a sharded
    weights checkpoint; refuses what safetensors cannot hold, before anything is written."""
    skeleton, metadata = read_folder_metadata(folder)
    tensors = _placeholders(metadata)
    payload = join_payload(skeleton["payload"], skeleton["tensors"], tensors)
    state_dict, extra = SafetensorsFormat.split_payload(payload)
    keys = {id(t): k for k, t in tensors.items()}
    header: dict[str, Any] = {"__metadata__": extra}
    order, offset = [], 0
    for name, t in state_dict.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
        order.append(keys[id(t)])
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    return raw, order, metadata


def export_sharded(source: Backend, to: str, target: Backend, name: str) -> WrittenFile:
    """Writes the sharded checkpoint folder `source` as one file `name` of `target` in format
    `to` ("torch" or "safetensors"), atomically, streaming tensor by tensor."""
    if to == "safetensors":
        header, order, metadata = safetensors_layout(source)
        total = (
            8
            + len(header)
            + sum(
                item.size.numel() * item.properties.dtype.itemsize
                for key in order
                if isinstance(item := metadata.state_dict_metadata[key], TensorStorageMetadata)
            )
        )

        def write(out: WriteStream) -> None:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            parts = PartFiles(source)
            try:
                for key in order:
                    for piece in tensor_pieces(source, metadata, key, parts):
                        out.write(piece)
            finally:
                parts.close()

        return target.write_file(name, write, total)
    if to != "torch":
        raise ValueError(f"cannot export to {to!r}; known: torch, safetensors")
    checked = read_folder_metadata(source)
    total = sum(
        item.size.numel() * item.properties.dtype.itemsize
        for item in checked[1].state_dict_metadata.values()
        if isinstance(item, TensorStorageMetadata)
    )
    return target.write_file(name, lambda out: write_torch(source, out, checked), total + 64 * 1024)
