"""The one way ksuit reads a checkpoint file: `weights_only=True`, always.

A file that carries pickled objects other than tensors and plain Python values is refused with
`UnsafeCheckpointError` naming the file; its code never runs.
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch

from ksuit.storage.errors import CorruptCheckpointError, UnsafeCheckpointError
from ksuit.storage.formats import SAFETENSORS_METADATA_MARKER, format_of_path


def _torch_load(path: Path, map_location: Any, mmap: bool) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it contains pickled objects that are not tensors or plain Python "
            f"values, and ksuit only loads with weights_only=True ({str(e).splitlines()[0]}). "
            "If you wrote this file yourself and trust it, load it with torch.load(..., weights_only=False) "
            "and re-save the plain state"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, struct.error) as e:
        raise CorruptCheckpointError(
            f"cannot read {path}: the file is truncated or corrupt ({str(e).splitlines()[0]}); "
            "run `ksuit verify` on the run folder and resume from another checkpoint"
        ) from e


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (no tensor bytes are read)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 * 1024 * 1024:
                raise ValueError(f"header of {n} bytes is implausible")
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise CorruptCheckpointError(f"cannot read the safetensors header of {path}: {e}") from e
    return header


def _decode_safetensors_metadata(metadata: dict[str, str]) -> dict[str, Any]:
    json_keys = set(json.loads(metadata.get(SAFETENSORS_METADATA_MARKER, "[]")))
    result: dict[str, Any] = {}
    for key, value in metadata.items():
        if key == SAFETENSORS_METADATA_MARKER:
            continue
        result[key] = json.loads(value) if key in json_keys else value
    return result


def load_file(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """Loads a `.th` or `.safetensors` checkpoint safely; safetensors returns the same dict
    shape as a `.th` weights file (`state_dict` plus the metadata keys)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    if format_of_path(path) == "safetensors":
        from safetensors.torch import load_file as st_load

        metadata = read_safetensors_header(path).get("__metadata__") or {}
        device = (
            "cpu"
            if map_location is None or not isinstance(map_location, (str, torch.device))
            else str(map_location)
        )
        try:
            state_dict = st_load(str(path), device=device)
        except Exception as e:  # safetensors raises its own error types
            raise CorruptCheckpointError(f"cannot read {path}: {e}") from e
        return {"state_dict": state_dict, **_decode_safetensors_metadata(metadata)}
    return _torch_load(path, map_location, mmap)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Everything in a checkpoint except tensor data: tensors become `{shape, dtype, nbytes}`.

    `.th` files are memory-mapped, so tensor bytes are never read; safetensors files are read
    only up to their header.
    """
    path = Path(path)
    if format_of_path(path) == "safetensors":
        header = read_safetensors_header(path)
        meta = _decode_safetensors_metadata(header.get("__metadata__") or {})
        tensors = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            start, end = info["data_offsets"]
            tensors[key] = {"shape": list(info["shape"]), "dtype": info["dtype"], "nbytes": end - start}
        return {"state_dict": tensors, **meta}
    payload = _torch_load(path, "cpu", mmap=True)
    return _describe(payload)


def _describe(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return {
            "shape": list(obj.shape),
            "dtype": str(obj.dtype).removeprefix("torch."),
            "nbytes": obj.numel() * obj.element_size(),
        }
    if isinstance(obj, dict):
        return {k: _describe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_describe(v) for v in obj]
    return obj
