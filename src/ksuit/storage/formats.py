"""File formats: how a payload dict becomes bytes, and how to read it back.

`torch`: the zip format `torch.save` writes and `torch.load(weights_only=True)` reads, written by
`torch.save` itself into the backend's stream, with CRC-32 off: ksuit's xxh3 checksum in the
manifest covers the whole file, and `torch.load` does not check CRC. Measured on the benchmark
state (2.88 GiB, `make bench` machine, 4 rounds in rotated order, every save through the same
O_DIRECT hashing stream): CRC on 3.55 s median, CRC off 1.40 s. A hand-written zip writer of
ksuit 0.1 took 1.67 s against 1.60 s for `torch.save` in the same run, so it was removed.
`safetensors`: for weights files only: the tensors of `state_dict` in the safetensors layout,
every other payload key JSON-encoded in the header's `__metadata__`.
"""

from __future__ import annotations

import contextlib
import io
import json
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Protocol, cast

import torch
from typing_extensions import Buffer

from ksuit.storage.backend import WriteStream
from ksuit.utils.gc_pause import gc_paused

_CRC_LOCK = threading.Lock()


@contextlib.contextmanager
def crc32_off() -> Iterator[None]:
    """`torch.save` without CRC-32 inside the block. torch keeps the option in a process-wide
    config, so ksuit's own saves (of several threads) take turns, and the old value comes back."""
    with _CRC_LOCK:
        before = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        try:
            yield
        finally:
            torch.serialization.set_crc32_options(before)


class Format(Protocol):
    """How a payload becomes the bytes of one file. The backend decides where the bytes go
    (`sink`: a hashing stream of a staged file)."""

    name: str
    extension: str

    def write(self, payload: dict[str, Any], sink: WriteStream) -> None: ...

    def estimate_nbytes(self, payload: dict[str, Any]) -> int: ...


def iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nested dict/list/tuple payload."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from iter_tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from iter_tensors(value)


def tensor_payload_nbytes(payload: Any) -> int:
    """Bytes the tensors of a payload take in a torch file (whole storages, each once)."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for t in iter_tensors(payload):
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if storage.data_ptr() == 0 or key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


class _KeepsWriteError:
    """The stream `torch.save` writes to, remembering the OSError of a failed write: torch turns
    it into a bare `RuntimeError("[enforce fail at inline_container.cc] ...")`."""

    def __init__(self, sink: WriteStream):
        self.sink = sink
        self.error: OSError | None = None

    def write(self, data: Buffer, /) -> int:
        try:
            return self.sink.write(data)
        except OSError as e:
            self.error = e
            raise

    def tell(self) -> int:
        return self.sink.tell()

    def flush(self) -> None:
        self.sink.flush()

    def writable(self) -> bool:
        return True


def torch_save(obj: Any, sink: WriteStream) -> None:
    """`torch.save(obj)` into `sink` with CRC-32 off; a failed write raises the disk's OSError.
    Cyclic garbage collection waits meanwhile (`ksuit.utils.gc_pause`: pickling a payload of
    many tensors otherwise sets off full collections that stall the training thread)."""
    if isinstance(sink, io.BytesIO):  # memory: no write fails, and torch writes to it directly
        with crc32_off(), gc_paused():
            torch.save(obj, sink)
        return
    out = _KeepsWriteError(sink)
    try:
        with crc32_off(), gc_paused():
            torch.save(obj, cast(IO[bytes], out))
    except RuntimeError as e:
        if out.error is not None:  # the disk's error (ENOSPC, EIO), not torch's wrapper of it
            raise out.error from e
        raise


class TorchFormat:
    """`.th` files: torch's zip format, loadable by plain `torch.load(weights_only=True)`."""

    name = "torch"
    extension = "th"

    def write(self, payload: dict[str, Any], sink: WriteStream) -> None:
        torch_save(payload, sink)

    def estimate_nbytes(self, payload: dict[str, Any]) -> int:
        # zip headers and 64-byte alignment per record, plus the pickled structure
        n_tensors = sum(1 for _ in iter_tensors(payload))
        return tensor_payload_nbytes(payload) + 200 * n_tensors + 64 * 1024


SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
):
    if hasattr(torch, _name):
        SAFETENSORS_DTYPES[getattr(torch, _name)] = _code

SAFETENSORS_METADATA_MARKER = "ksuit.json_keys"


class SafetensorsFormat:
    """Writes safetensors files directly from tensor memory: one header, then raw bytes."""

    name = "safetensors"
    extension = "safetensors"

    @staticmethod
    def split_payload(payload: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        state_dict = payload.get("state_dict")
        if not isinstance(state_dict, dict):
            raise TypeError(
                "safetensors format needs a weights payload with a 'state_dict' dict of tensors "
                f"(got keys {sorted(map(str, payload))[:5]}); "
                "optimizer and trainer files stay in format='torch'"
            )
        for key, value in state_dict.items():
            if not isinstance(key, str) or not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"safetensors format stores only str -> tensor state dicts; key {key!r} holds "
                    f"{type(value).__name__}. Use format='torch' for this checkpoint"
                )
            if value.dtype not in SAFETENSORS_DTYPES:
                raise TypeError(
                    f"safetensors cannot store dtype {value.dtype} of '{key}'; use format='torch'"
                )
            if value.is_sparse or value.layout != torch.strided:
                raise TypeError(f"safetensors cannot store the sparse tensor '{key}'; use format='torch'")
        metadata = {}
        for key, value in payload.items():
            if key == "state_dict":
                continue
            try:
                metadata[key] = json.dumps(value)
            except TypeError as e:
                raise TypeError(
                    f"safetensors metadata must be JSON-serializable; '{key}' is not ({e}). "
                    "Use format='torch' for payloads with tensors outside state_dict"
                ) from e
        metadata[SAFETENSORS_METADATA_MARKER] = json.dumps(sorted(metadata))
        return state_dict, metadata

    def _layout(self, payload: dict[str, Any]) -> tuple[bytes, list[torch.Tensor]]:
        state_dict, metadata = self.split_payload(payload)
        header: dict[str, Any] = {"__metadata__": metadata}
        tensors = []
        offset = 0
        for key in state_dict:  # file order = state dict order: loads read sequentially
            t = state_dict[key]
            nbytes = t.numel() * t.element_size()
            header[key] = {
                "dtype": SAFETENSORS_DTYPES[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
            tensors.append(t)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * ((8 - len(raw) % 8) % 8)  # align the data section as safetensors does
        return raw, tensors

    def write(self, payload: dict[str, Any], sink: WriteStream) -> None:
        header, tensors = self._layout(payload)
        sink.write(struct.pack("<Q", len(header)))
        sink.write(header)
        for t in tensors:
            if t.numel() == 0:
                continue
            t = t.detach()
            if t.device.type != "cpu":
                t = t.cpu()
            if not t.is_contiguous():
                t = t.contiguous()
            sink.write(cast(Buffer, t.reshape(-1).view(torch.uint8).numpy()))

    def estimate_nbytes(self, payload: dict[str, Any]) -> int:
        state_dict = payload.get("state_dict") or {}
        data = sum(t.numel() * t.element_size() for t in state_dict.values() if isinstance(t, torch.Tensor))
        return data + 64 * 1024 + 200 * len(state_dict)


FORMATS: dict[str, Format] = {"torch": TorchFormat(), "safetensors": SafetensorsFormat()}


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown checkpoint format {name!r}; known: {', '.join(FORMATS)}") from None


def format_of_path(path: str | Path) -> str:
    return "safetensors" if str(path).endswith(".safetensors") else "torch"
