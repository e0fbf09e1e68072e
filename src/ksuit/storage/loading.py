"""The one way ksuit reads a checkpoint file: checked first, then `weights_only=True`, always.

Every file is untrusted. Before `torch.load` sees a `.th` file, `ksuit.storage.torch_archive`
checks its zip directory and scans its pickle against an allowlist without running it; a
safetensors header is parsed and checked field by field before its tensors are mapped. Only
regular files are opened (never a FIFO or device), through one descriptor, so the file checked
is the file loaded. What is refused raises, naming the file:

- `UnsafeCheckpointError`: pickled objects other than tensors and plain Python values (their
  code never runs), compressed records, sizes beyond sane bounds, special files, and links
  where links are not followed;
- `CorruptCheckpointError`: anything else that is not a readable checkpoint (empty, truncated,
  random bytes, inconsistent sizes or offsets, wrongly typed headers).
"""

from __future__ import annotations

import io
import json
import pickle
import struct
from typing import Any

import torch

from ksuit.layout import is_sharded_filename
from ksuit.storage.backend import Backend, Location, OpenedFile
from ksuit.storage.errors import CorruptCheckpointError, UnsafeCheckpointError
from ksuit.storage.formats import SAFETENSORS_DTYPES, SAFETENSORS_METADATA_MARKER, format_of_path
from ksuit.storage.locations import split_file_location
from ksuit.storage.torch_archive import HINT, check_torch_archive

MAX_SAFETENSORS_HEADER_BYTES = 100 * 1024 * 1024  # the bound the safetensors library itself uses
SAFETENSORS_ITEMSIZE = {code: dtype.itemsize for dtype, code in SAFETENSORS_DTYPES.items()}
# what read_metadata describes at most: values, nesting levels, characters per string
MAX_DESCRIBED_VALUES = 100_000
MAX_DESCRIBED_DEPTH = 32
MAX_DESCRIBED_CHARS = 10_000
MAX_DESCRIBED_TOTAL_CHARS = 1_000_000


def _torch_load(f: OpenedFile, map_location: Any, mmap: bool) -> Any:
    check_torch_archive(f)
    path = f.location
    local = f.local_path()
    source: Any = local if local is not None else io.BytesIO(f.read_at(0, f.size))
    try:
        return torch.load(
            source, map_location=map_location, weights_only=True, mmap=mmap and local is not None
        )
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it contains pickled objects that are not tensors or plain Python "
            f"values, and ksuit only loads with weights_only=True ({str(e).splitlines()[0]}){HINT}"
        ) from None
    except Exception as e:  # anything else torch raises on a file that passed the checks
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CorruptCheckpointError(
            f"cannot read {path}: the file is truncated or corrupt ({first}); "
            "run `ksuit verify` on the run folder and resume from another checkpoint"
        ) from e


def _corrupt_header(path: str, problem: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"cannot read the safetensors header of {path}: {problem}; the file is damaged or not a "
        "safetensors file: restore it or resume from another checkpoint"
    )


def _read_header(f: OpenedFile) -> dict[str, Any]:
    path, file_size = f.location, f.size
    head = f.read_at(0, 8)
    if len(head) != 8:
        raise _corrupt_header(path, f"the file is {file_size} bytes, too short for a header")
    (n,) = struct.unpack("<Q", head)
    if n > min(MAX_SAFETENSORS_HEADER_BYTES, file_size - 8):
        raise _corrupt_header(path, f"a header of {n} bytes does not fit in a file of {file_size} bytes")
    try:
        header = json.loads(f.read_at(8, n))
    except (ValueError, RecursionError) as e:  # bad UTF-8, bad JSON, nesting too deep
        raise _corrupt_header(
            path, f"it is not JSON ({str(e).splitlines()[0] or type(e).__name__})"
        ) from None
    _check_header(header, file_size - 8 - n, path)
    checked: dict[str, Any] = header
    return checked


def _check_header(header: Any, data_size: int, path: str) -> None:
    """Types, dtypes, shapes and offsets of every tensor entry, as safetensors defines them:
    the entries' byte ranges tile the data section exactly."""
    if not isinstance(header, dict):
        raise _corrupt_header(path, f"it is a JSON {type(header).__name__}, not an object")
    metadata = header.get("__metadata__")
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values())
    ):
        raise _corrupt_header(path, "__metadata__ is not an object of strings")
    if metadata and "state_dict" in metadata:
        raise _corrupt_header(path, "__metadata__ has a 'state_dict' entry, which would replace its tensors")
    ranges = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        where = f"tensor {key!r}"
        if not isinstance(info, dict):
            raise _corrupt_header(path, f"{where} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_ITEMSIZE:
            raise _corrupt_header(path, f"{where} has an unknown dtype {str(dtype)[:40]!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise _corrupt_header(path, f"{where} has a shape that is not a list of ints >= 0")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int and o >= 0 for o in offsets)
        ):
            raise _corrupt_header(path, f"{where} has data_offsets that are not [begin, end]")
        numel = 1
        for d in shape:
            numel *= d
        begin, end = offsets
        if end - begin != numel * SAFETENSORS_ITEMSIZE[dtype]:
            raise _corrupt_header(path, f"{where} has data_offsets that do not match its shape and dtype")
        ranges.append((begin, end, key))
    position = 0
    for begin, end, key in sorted(ranges):
        if begin != position:
            raise _corrupt_header(path, f"tensor {key!r} overlaps another or leaves a gap")
        position = end
    if position != data_size:
        raise _corrupt_header(path, f"its tensors take {position} bytes but the file holds {data_size}")


def read_safetensors_header(location: Location) -> dict[str, Any]:
    """The JSON header of a safetensors file, checked (no tensor bytes are read)."""
    backend, name = split_file_location(location)
    with _opened(backend, name, follow_symlinks=True) as f:
        return _read_header(f)


def _decode_safetensors_metadata(metadata: dict[str, str], path: str) -> dict[str, Any]:
    try:
        json_keys = json.loads(metadata.get(SAFETENSORS_METADATA_MARKER, "[]"))
        if not isinstance(json_keys, list) or not all(isinstance(k, str) for k in json_keys):
            raise ValueError(f"{SAFETENSORS_METADATA_MARKER} is not a list of keys")
        result: dict[str, Any] = {}
        for key, value in metadata.items():
            if key == SAFETENSORS_METADATA_MARKER:
                continue
            result[key] = json.loads(value) if key in json_keys else value
    except (ValueError, RecursionError) as e:
        raise _corrupt_header(path, f"its metadata is damaged ({str(e).splitlines()[0]})") from None
    return result


def _opened(backend: Backend, name: str, follow_symlinks: bool) -> OpenedFile:
    return backend.open(name, follow_symlinks=follow_symlinks)


def load_file(
    location: Location, map_location: Any = "cpu", mmap: bool = False, follow_symlinks: bool = True
) -> Any:
    """Loads a `.th` or `.safetensors` checkpoint safely; safetensors returns the same dict
    shape as a `.th` weights file (`state_dict` plus the metadata keys).

    `follow_symlinks=False` refuses a path that is a symbolic link (files of a run folder).
    """
    backend, name = split_file_location(location)
    with _opened(backend, name, follow_symlinks) as f:
        return load_opened(f, map_location, mmap)


def load_opened(f: OpenedFile, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """`load_file` of a file already opened through its backend."""
    if format_of_path(f.name) != "safetensors":
        return _torch_load(f, map_location, mmap)
    from safetensors.torch import load as st_load_bytes
    from safetensors.torch import load_file as st_load

    metadata = _read_header(f).get("__metadata__") or {}
    device = (
        "cpu"
        if map_location is None or not isinstance(map_location, (str, torch.device))
        else str(map_location)
    )
    local = f.local_path()
    try:
        if local is not None:
            state_dict = st_load(local, device=device)
        else:
            state_dict = {k: v.to(device) for k, v in st_load_bytes(f.read_at(0, f.size)).items()}
    except Exception as e:  # safetensors raises its own error types
        raise CorruptCheckpointError(f"cannot read {f.location}: {str(e).splitlines()[0]}") from e
    return {"state_dict": state_dict, **_decode_safetensors_metadata(metadata, f.location)}


def read_metadata(location: Location) -> dict[str, Any]:
    """Everything in a checkpoint except tensor data: tensors become `{shape, dtype, nbytes}`.

    `.th` files are memory-mapped, so tensor bytes are never read; safetensors files are read
    only up to their header. At most `MAX_DESCRIBED_VALUES` values, `MAX_DESCRIBED_DEPTH`
    levels, `MAX_DESCRIBED_CHARS` characters per string and `MAX_DESCRIBED_TOTAL_CHARS` in all
    are described; what is left out is replaced by a string saying so.
    """
    backend, name = split_file_location(location)
    if is_sharded_filename(name):  # a folder: its skeleton and .metadata, no part file opened
        from ksuit.storage.sharded.verify import describe

        sharded: dict[str, Any] = _describe(describe(backend.child(name)), _Budget())
        return sharded
    with _opened(backend, name, follow_symlinks=True) as f:
        if format_of_path(name) == "safetensors":
            header = _read_header(f)
            meta = _decode_safetensors_metadata(header.get("__metadata__") or {}, f.location)
            tensors = {}
            for key, info in header.items():
                if key != "__metadata__":
                    start, end = info["data_offsets"]
                    tensors[key] = {
                        "shape": list(info["shape"]),
                        "dtype": info["dtype"],
                        "nbytes": end - start,
                    }
            described: dict[str, Any] = _describe({"state_dict": tensors, **meta}, _Budget())
            return described
        payload = _describe(_torch_load(f, "cpu", mmap=True), _Budget())
        return payload if isinstance(payload, dict) else {"value": payload}


class _Budget:
    def __init__(self) -> None:
        self.values = MAX_DESCRIBED_VALUES
        self.chars = MAX_DESCRIBED_TOTAL_CHARS

    def text(self, obj: str | bytes | bytearray) -> str | bytes | bytearray:
        """`obj`, or its start with a note of what was cut (per string and in total)."""
        keep = max(min(len(obj), MAX_DESCRIBED_CHARS, self.chars), 0)
        self.chars -= keep
        if keep == len(obj):
            return obj
        note = f"... ({len(obj) - keep} more characters not shown)"
        if isinstance(obj, str):
            return obj[:keep] + note
        return bytes(obj[:keep]) + note.encode()


def _describe(obj: Any, budget: _Budget, depth: int = 0) -> Any:
    """A tree of plain values (tensors as descriptions) of bounded size, whatever `obj` shares."""
    if isinstance(obj, torch.Tensor):
        return {
            "shape": list(obj.shape),
            "dtype": str(obj.dtype).removeprefix("torch."),
            "nbytes": obj.numel() * obj.element_size(),
        }
    if isinstance(obj, (str, bytes, bytearray)):
        return budget.text(obj)
    if not isinstance(obj, (dict, list, tuple, set, frozenset)):
        return obj
    if depth >= MAX_DESCRIBED_DEPTH:
        return f"<{type(obj).__name__} nested deeper than {MAX_DESCRIBED_DEPTH} levels, not shown>"
    items = list(obj.items()) if isinstance(obj, dict) else list(obj)
    shown = items[: max(budget.values, 0)]
    budget.values -= len(shown)
    left_out = f"<{len(items) - len(shown)} more values not shown>"
    if isinstance(obj, dict):
        result = {
            budget.text(k) if isinstance(k, str) else k: _describe(v, budget, depth + 1) for k, v in shown
        }
        if len(shown) < len(items):
            result["..."] = left_out
        return result
    values = [_describe(v, budget, depth + 1) for v in shown]
    if isinstance(obj, (set, frozenset)) and len(shown) == len(items):
        return obj
    return values + ([left_out] if len(shown) < len(items) else [])
