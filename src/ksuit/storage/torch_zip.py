"""A direct writer of the torch zip checkpoint format (what `torch.save` writes).

Why: ksuit wants every byte of a checkpoint to go out in large sequential writes through its
hashing sink, with no detour through torch's C++ zip writer and its per-record Python
callbacks. The output is a file `torch.load(weights_only=True)` and `torch.load(mmap=True)`
read like any `torch.save` file, without ksuit installed:

- `archive/data.pkl`: the object pickled (protocol 2) exactly as `torch.save` pickles it, each
  storage replaced by the persistent id `("storage", <Type>Storage, key, location, numel)`;
- `archive/.format_version` (`1`), `archive/.storage_alignment` (`64`), `archive/byteorder`;
- `archive/data/<key>`: the raw bytes of each storage, in key order, 64-byte aligned (padding
  goes into an `FB` extra field, as torch does, so `mmap=True` can map tensors in place);
- `archive/version` (`3`), `archive/.data/serialization_id`;
- the central directory, a zip64 end record and locator, and the classic end record. Sizes
  and offsets past 4 GiB use zip64 extra fields.

All records are STORED (uncompressed). CRC-32 is computed for records under 1 MiB and left 0
for larger ones, as `torch.save` does with `compute_crc32` off: torch does not check it, and
ksuit's manifest holds an xxh3-64 checksum of the whole file.
"""

from __future__ import annotations

import io
import pickle
import secrets
import struct
import sys
import zlib
from typing import Any

import torch
from torch.serialization import location_tag, normalize_storage_type

ALIGNMENT = 64
ARCHIVE = "archive"
CHUNK_BYTES = 64 << 20
CRC_LIMIT = 1 << 20
_U32 = 0xFFFFFFFF  # the "look in the zip64 extra field" marker
ZIP64_LIMIT = 0xFFFFFFFF  # sizes and offsets from here on go into zip64 fields (tests lower it)
_ZIP64_VERSION = 45


def pickle_with_storages(obj: Any) -> tuple[bytes, dict[str, torch.UntypedStorage]]:
    """`(data.pkl bytes, {key: storage})`, with the persistent ids `torch.save` uses."""
    storages: dict[str, torch.UntypedStorage] = {}
    keys: dict[int, str] = {}
    dtypes: dict[int, torch.dtype] = {}

    def persistent_id(o: Any) -> tuple | None:
        if isinstance(o, torch.storage.TypedStorage):
            storage = o._untyped_storage
            dtype = o.dtype
            storage_type = getattr(torch, o._pickle_storage_type())
            numel = o._size()
        elif torch.is_storage(o):
            storage, dtype = o, torch.uint8
            storage_type = normalize_storage_type(type(o))
            numel = storage.nbytes()
        else:
            return None
        if str(storage.device) != "meta" and storage.data_ptr() != 0:
            if dtypes.setdefault(storage.data_ptr(), dtype) != dtype:
                raise RuntimeError(
                    "cannot save tensors that view the same memory as different dtypes; "
                    "save a .clone() of one of them"
                )
        key = keys.setdefault(storage._cdata, str(len(keys)))
        storages[key] = storage
        return ("storage", storage_type, key, location_tag(storage), numel)

    class _Pickler(pickle.Pickler):
        def persistent_id(self, o: Any) -> tuple | None:
            return persistent_id(o)

    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue(), storages


def _storage_bytes(storage: torch.UntypedStorage) -> memoryview:
    """The bytes of a storage as a memoryview (no copy for CPU storages)."""
    if storage.device.type != "cpu":
        storage = storage.cpu()
    if storage.nbytes() == 0:
        return memoryview(b"")
    t = torch.empty(0, dtype=torch.uint8).set_(storage)
    return memoryview(t.numpy()).cast("B")


class _ZipStream:
    """Writes STORED zip records to a sink, tracking offsets for the central directory."""

    def __init__(self, sink: Any):
        self.sink = sink
        self.offset = 0
        self.entries: list[tuple[bytes, int, int, int]] = []  # name, crc, size, header offset

    def _out(self, data: bytes | memoryview) -> None:
        self.sink.write(data)
        self.offset += memoryview(data).nbytes

    def record(self, name: str, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
        size = view.nbytes
        crc = zlib.crc32(view) if size < CRC_LIMIT else 0
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
        for begin in range(0, size, CHUNK_BYTES):
            self._out(view[begin : begin + CHUNK_BYTES])
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


def write_torch_zip(obj: Any, sink: Any) -> None:
    """Writes `obj` in torch's zip checkpoint format to `sink` (anything with `write(buffer)`)."""
    data_pkl, storages = pickle_with_storages(obj)
    z = _ZipStream(sink)
    z.record("data.pkl", data_pkl)
    z.record(".format_version", b"1")
    z.record(".storage_alignment", str(ALIGNMENT).encode())
    z.record("byteorder", sys.byteorder.encode())
    for key, storage in storages.items():
        z.record(f"data/{key}", _storage_bytes(storage))
    z.record("version", b"3\n")
    z.record(".data/serialization_id", f"{secrets.randbelow(10**40):040d}".encode())
    z.finish()
