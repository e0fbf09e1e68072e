"""Loading a leaf's weights and optimizer state from any checkpoint file into the leaf as it is
placed in this run: a file or a sharded checkpoint folder, into a plain or a sharded leaf.

A sharded checkpoint loaded into a sharded leaf is resharded by torch.distributed.checkpoint:
each rank reads exactly its shards, whatever the world size that wrote it (a collective: every
rank loads together). A sharded checkpoint into a plain leaf is consolidated in this process; a
file into a sharded leaf is sliced into each rank's shards locally (no communication).
"""

from __future__ import annotations

from typing import Any

import torch

from ksuit.layout import is_sharded_filename
from ksuit.models.base import Model
from ksuit.models.sharding import is_sharded
from ksuit.readers.model_loading import check_sharded, load_payload
from ksuit.storage import Location, split_file_location


def _sharded_folder(path: Location) -> Any:
    folder, name = split_file_location(path)
    check_sharded(folder, name)
    return folder.child(name)


def _like(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `target`: this rank's shard of it when `target` is a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor):
        return distribute_tensor(
            full.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None
        )
    return full


def place_like(state: dict[str, Any], own: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A full state dict laid out like `own` (this rank's shard of each DTensor there)."""
    return {k: _like(v, own[k]) if k in own and isinstance(v, torch.Tensor) else v for k, v in state.items()}


def state_dict_of(payload: Any, path: Location) -> dict[str, torch.Tensor]:
    """The `state_dict` of the weights payload loaded from `path`; a clear error for any other
    payload."""
    if not isinstance(payload, dict) or not isinstance(payload.get("state_dict"), dict):
        raise ValueError(
            f"{path} is not a ksuit weights file (no 'state_dict' dict); save weights with "
            "CheckpointWriter or load it with torch.load yourself"
        )
    state: dict[str, torch.Tensor] = payload["state_dict"]
    return state


def load_state_like(
    own: dict[str, torch.Tensor], path: Location, payload: Any = None
) -> dict[str, torch.Tensor]:
    """The `state_dict` of the weights file (or sharded folder) at `path`, each tensor laid out
    like the tensor of `own` under its key (this rank's shard of a DTensor). `payload`: the
    file's contents, when the caller has loaded and checked them already."""
    name = split_file_location(path)[1]
    sharded = any(type(t).__name__ == "DTensor" for t in own.values())
    if sharded and is_sharded_filename(name):
        from ksuit.storage.sharded.load import load_resharded

        def target(key: str, where: list[Any], _: Any) -> torch.Tensor:
            if len(where) != 2 or where[0] != "state_dict" or where[1] not in own:
                raise ValueError(f"{path} holds {where!r}, which the model it is loaded into has not")
            return own[where[1]]

        state: dict[str, torch.Tensor] = load_resharded(_sharded_folder(path), target)["state_dict"]
        return state
    full = state_dict_of(load_payload(path) if payload is None else payload, path)
    return place_like(full, own) if sharded else full


def load_leaf_weights(leaf: Model, path: Location, payload: Any = None) -> None:
    """Loads the weights file (or sharded folder) at `path` into `leaf`; `payload`: the file's
    contents, when the caller has loaded and checked them already."""
    if not is_sharded(leaf):
        leaf.load_state_dict(state_dict_of(load_payload(path) if payload is None else payload, path))
        return
    leaf.load_state_dict(load_state_like(leaf.state_dict(), path, payload))


def load_leaf_optimizer(leaf: Model, path: Location, payload: Any = None) -> None:
    """Loads the optimizer file (or sharded folder) at `path` into `leaf`'s optimizer; `payload`:
    the file's contents, when the caller has loaded and checked them already."""
    optimizer = leaf.optimizer
    if optimizer is None:
        raise ValueError(f"{leaf.name} has no optimizer to load {path} into")
    name = split_file_location(path)[1]
    if not is_sharded(leaf):
        optimizer.load_state_dict(load_payload(path) if payload is None else payload)
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def param_of(where: list[Any], shape: tuple[int, ...]) -> torch.Tensor | None:
        if (
            len(where) == 3
            and where[0] == "state"
            and isinstance(where[1], int)
            and 0 <= where[1] < len(params)
        ):
            p: torch.Tensor = params[where[1]]
            return p if tuple(p.shape) == shape else None
        return None

    if is_sharded_filename(name):
        from ksuit.storage.sharded.load import load_resharded

        def target(key: str, where: list[Any], item: Any) -> torch.Tensor:
            dtype, shape = item.properties.dtype, tuple(item.size)
            p = param_of(where, shape)
            return torch.empty_like(p, dtype=dtype) if p is not None else torch.empty(shape, dtype=dtype)

        state = load_resharded(_sharded_folder(path), target)
    else:
        state = load_payload(path) if payload is None else payload
        for index, entry in state.get("state", {}).items():
            for key, value in entry.items():
                p = (
                    param_of(["state", index, key], tuple(value.shape))
                    if isinstance(value, torch.Tensor)
                    else None
                )
                if p is not None:
                    entry[key] = _like(value, p)
    optimizer.load_state_dict(state)
