"""Writing torch's zip checkpoint format as a stream, record by record, with each storage's bytes
produced on demand: how `ksuit export` consolidates a sharded checkpoint into one `.th` file
without ever holding more than one tensor.

The file is what `torch.save` writes, read by plain `torch.load(weights_only=True)` and
`torch.load(mmap=True)` without ksuit:

- `archive/data.pkl`: the payload pickled (protocol 2) exactly as `torch.save` pickles it, each
  storage replaced by the persistent id `("storage", <Type>Storage, key, "cpu", numel)`;
- `archive/.format_version`, `archive/.storage_alignment` (64), `archive/byteorder`;
- `archive/data/<key>`: the raw bytes of each storage, in key order, 64-byte aligned (padding in
  an `FB` extra field, as torch does);
- `archive/version`, `archive/.data/serialization_id`, the central directory and zip64 records.

The payload is pickled with placeholder tensors: `torch.empty` of each tensor's shape and dtype,
an allocation whose pages are never touched (so never resident), which gives `torch.save`'s
exact pickle; the bytes of each storage then come from a callback, in pieces. Records are
STORED; CRC-32 is computed for records under 1 MiB and left 0 above, as `torch.save` does with
CRC off (torch does not check it; ksuit's checksums cover files).
"""

from __future__ import annotations

import io
import pickle
import secrets
import struct
import sys
import zlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.serialization import location_tag, normalize_storage_type
from typing_extensions import Buffer

from ksuit.storage.backend import WriteStream

ALIGNMENT = 64
ARCHIVE = "archive"
CRC_LIMIT = 1 << 20
_U32 = 0xFFFFFFFF
ZIP64_LIMIT = 0xFFFFFFFF
_ZIP64_VERSION = 45

BytesOf = Callable[[torch.Tensor], Iterable[Buffer]]
"""The bytes of a placeholder tensor's storage, in order, in pieces."""


def pickle_with_storages(obj: Any) -> tuple[bytes, dict[str, torch.UntypedStorage]]:
    """`(data.pkl bytes, {key: storage})`, with the persistent ids `torch.save` uses."""
    storages: dict[str, torch.UntypedStorage] = {}
    keys: dict[int, str] = {}

    def persistent_id(o: Any) -> tuple[Any, ...] | None:
        if isinstance(o, torch.storage.TypedStorage):
            storage = o._untyped_storage
            storage_type = getattr(torch, o._pickle_storage_type())  # type: ignore[no-untyped-call]
            numel = o._size()  # type: ignore[no-untyped-call]
        elif torch.is_storage(o):
            storage = o
            storage_type = normalize_storage_type(type(o))  # type: ignore[no-untyped-call]
            numel = storage.nbytes()
        else:
            return None
        key = keys.setdefault(storage._cdata, str(len(keys)))
        storages[key] = storage
        return ("storage", storage_type, key, location_tag(storage), numel)

    class _Pickler(pickle.Pickler):
        def persistent_id(self, o: Any) -> tuple[Any, ...] | None:
            return persistent_id(o)

    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue(), storages


class ZipStream:
    """Writes STORED zip records to a stream, tracking offsets for the central directory."""

    def __init__(self, sink: WriteStream):
        self.sink = sink
        self.offset = 0
        self.entries: list[tuple[bytes, int, int, int]] = []  # name, crc, size, header offset

    def _out(self, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        self.sink.write(view)
        self.offset += view.nbytes

    def record(self, name: str, size: int, pieces: Iterable[Buffer]) -> None:
        """One record of `size` bytes, written from `pieces` (which must add up to `size`)."""
        crc = 0
        if size < CRC_LIMIT:
            data = b"".join(bytes(memoryview(p).cast("B")) for p in pieces)
            crc, pieces = zlib.crc32(data), [data]
        raw_name = f"{ARCHIVE}/{name}".encode()
        header_offset = self.offset
        zip64 = size >= ZIP64_LIMIT
        extra = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""
        start = header_offset + 30 + len(raw_name) + len(extra) + 4
        pad = (-start) % ALIGNMENT
        extra += b"FB" + struct.pack("<H", pad) + b"Z" * pad
        small = _U32 if zip64 else size
        self._out(
            struct.pack(
                "<IHHHHHIIIHH",
                0x04034B50,
                _ZIP64_VERSION if zip64 else 20,
                0,
                0,
                0,
                0x21,
                crc,
                small,
                small,
                len(raw_name),
                len(extra),
            )
            + raw_name
            + extra
        )
        written = 0
        for piece in pieces:
            view = memoryview(piece).cast("B")
            written += view.nbytes
            if written > size:
                raise ValueError(f"record {name} got more than its {size} bytes")
            self._out(view)
        if written != size:
            raise ValueError(f"record {name} got {written} of its {size} bytes")
        self.entries.append((raw_name, crc, size, header_offset))

    def finish(self) -> None:
        cd_offset = self.offset
        central = bytearray()
        for raw_name, crc, size, header_offset in self.entries:
            big_size, big_offset = size >= ZIP64_LIMIT, header_offset >= ZIP64_LIMIT
            fields = ([size, size] if big_size else []) + ([header_offset] if big_offset else [])
            extra = (
                struct.pack("<HH", 1, 8 * len(fields)) + struct.pack(f"<{len(fields)}Q", *fields)
                if fields
                else b""
            )
            version = _ZIP64_VERSION if fields else 20
            central += struct.pack(
                "<IHHHHHHIIIHHHHHII",
                0x02014B50,
                (3 << 8) | version,
                version,
                0,
                0,
                0,
                0x21,
                crc,
                _U32 if big_size else size,
                _U32 if big_size else size,
                len(raw_name),
                len(extra),
                0,
                0,
                0,
                0,
                _U32 if big_offset else header_offset,
            )
            central += raw_name + extra
        self._out(bytes(central))
        n, cd_size = len(self.entries), len(central)
        eocd64_offset = self.offset
        self._out(
            struct.pack(
                "<IQHHIIQQQQ",
                0x06064B50,
                44,
                (3 << 8) | _ZIP64_VERSION,
                _ZIP64_VERSION,
                0,
                0,
                n,
                n,
                cd_size,
                cd_offset,
            )
            + struct.pack("<IIQI", 0x07064B50, 0, eocd64_offset, 1)
            + struct.pack(
                "<IHHHHIIH",
                0x06054B50,
                0,
                0,
                min(n, 0xFFFF),
                min(n, 0xFFFF),
                _U32 if cd_size >= ZIP64_LIMIT else cd_size,
                _U32 if cd_offset >= ZIP64_LIMIT else cd_offset,
                0,
            )
        )


def placeholder(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor of `shape` and `dtype` whose memory is allocated but never touched."""
    return torch.empty(shape, dtype=dtype)


def write_streamed(payload: Any, bytes_of: BytesOf, sink: WriteStream) -> None:
    """Writes `payload` (whose tensors are `placeholder`s, each its own storage) in torch's
    format to `sink`, every storage's bytes from `bytes_of(placeholder)`."""
    data_pkl, storages = pickle_with_storages(payload)
    owner: dict[int, torch.Tensor] = {}

    def collect(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            owner[obj.untyped_storage()._cdata] = obj
        elif isinstance(obj, dict):
            for v in obj.values():
                collect(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                collect(v)

    collect(payload)
    z = ZipStream(sink)
    z.record("data.pkl", len(data_pkl), [data_pkl])
    z.record(".format_version", 1, [b"1"])
    z.record(".storage_alignment", 2, [str(ALIGNMENT).encode()])
    z.record("byteorder", len(sys.byteorder), [sys.byteorder.encode()])
    for key, storage in storages.items():
        tensor = owner[storage._cdata]
        z.record(f"data/{key}", storage.nbytes(), bytes_of(tensor) if storage.nbytes() else [])
    z.record("version", 2, [b"3\n"])
    z.record(".data/serialization_id", 40, [f"{secrets.randbelow(10**40):040d}".encode()])
    z.finish()
