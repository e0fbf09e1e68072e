"""DTensors in a payload as plain local shards and back, for snapshots: an asynchronous save
copies each rank's own shard (no communication) and writes the copy as the same DTensor."""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor

Rewrap = dict[tuple[Any, ...], tuple[Any, Any, torch.Size, tuple[int, ...]]]


def to_local(payload: Any) -> tuple[Any, Rewrap]:
    """`payload` with every DTensor replaced by its local shard, and what `rewrap` needs."""
    layout: Rewrap = {}

    def walk(obj: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(obj, DTensor):
            layout[path] = (obj.device_mesh, obj.placements, obj.shape, obj.stride())
            return obj.to_local()
        if isinstance(obj, dict):
            return type(obj)((k, walk(v, (*path, k))) for k, v in obj.items())
        if isinstance(obj, list):
            return [walk(v, (*path, i)) for i, v in enumerate(obj)]
        if isinstance(obj, tuple):
            return tuple(walk(v, (*path, i)) for i, v in enumerate(obj))
        return obj

    return walk(payload, ()), layout


def rewrap(payload: Any, layout: Rewrap) -> Any:
    """The DTensors `to_local` took apart, around the (snapshot) local tensors of `payload`."""

    def walk(obj: Any, path: tuple[Any, ...]) -> Any:
        if path in layout:
            mesh, placements, shape, stride = layout[path]
            return DTensor.from_local(obj, mesh, placements, run_check=False, shape=shape, stride=stride)
        if isinstance(obj, dict):
            return type(obj)((k, walk(v, (*path, k))) for k, v in obj.items())
        if isinstance(obj, list):
            return [walk(v, (*path, i)) for i, v in enumerate(obj)]
        if isinstance(obj, tuple):
            return tuple(walk(v, (*path, i)) for i, v in enumerate(obj))
        return obj

    return walk(payload, ())
