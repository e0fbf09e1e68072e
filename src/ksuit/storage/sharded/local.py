"""DTensors in a payload as plain local shards and back, for snapshots: an asynchronous save
copies each rank's own shard (no communication) and writes the copy as the same DTensor."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.tensor import DTensor

Rewrap = dict[tuple[Any, ...], tuple[Any, Any, torch.Size, tuple[int, ...]]]


def _map(obj: Any, leaf: Callable[[Any, tuple[Any, ...]], Any], path: tuple[Any, ...] = ()) -> Any:
    """`obj` rebuilt through its dicts, lists and tuples, each other object (and each DTensor,
    and each object at a path `leaf` claims) replaced by `leaf(obj, path)`."""
    done = leaf(obj, path)
    if done is not _DESCEND:
        return done
    if isinstance(obj, dict):
        return type(obj)((k, _map(v, leaf, (*path, k))) for k, v in obj.items())
    if isinstance(obj, list):
        return [_map(v, leaf, (*path, i)) for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(_map(v, leaf, (*path, i)) for i, v in enumerate(obj))
    return obj


_DESCEND = object()


def to_local(payload: Any) -> tuple[Any, Rewrap]:
    """`payload` with every DTensor replaced by its local shard, and what `rewrap` needs."""
    layout: Rewrap = {}

    def leaf(obj: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(obj, DTensor):
            layout[path] = (obj.device_mesh, obj.placements, obj.shape, obj.stride())
            return obj.to_local()
        return _DESCEND

    return _map(payload, leaf), layout


def rewrap(payload: Any, layout: Rewrap) -> Any:
    """The DTensors `to_local` took apart, around the (snapshot) local tensors of `payload`."""

    def leaf(obj: Any, path: tuple[Any, ...]) -> Any:
        if path in layout:
            mesh, placements, shape, stride = layout[path]
            return DTensor.from_local(obj, mesh, placements, run_check=False, shape=shape, stride=stride)
        return _DESCEND

    return _map(payload, leaf)
