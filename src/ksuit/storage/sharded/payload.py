"""A payload as DCP sees it: its tensors under flat keys, and everything else as a skeleton.

ksuit's sharded checkpoint holds the same payload as the file it replaces (a weights file's
`{state_dict, checkpoint_tag, run_id, model_config, ...}`, an optimizer's `state_dict()`), split
in two: every tensor (a DTensor shard, or a plain tensor) goes through DCP under a flat key,
and the rest, with `None` where each tensor was, is the *skeleton* kept in the folder's
weights-only `ksuit.th`, with the path of every key. So nothing but tensors reaches DCP's
pickled bytes, and `join_payload(skeleton, paths, tensors)` rebuilds the exact payload.

Keys: a weights file's `state_dict[k]` is stored as `k` itself (so plain
`torch.distributed.checkpoint.load(model.state_dict(), ...)` reads a ksuit checkpoint), every
other tensor as its path joined by '.' (`state.0.exp_avg`); `#<n>` makes a clash unique.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

Path_ = list[str | int]


def _key(path: Path_) -> str:
    if len(path) == 2 and path[0] == "state_dict" and isinstance(path[1], str):
        return path[1]
    return ".".join(str(p) for p in path)


def split_payload(payload: Any) -> tuple[Any, dict[str, torch.Tensor], dict[str, Path_]]:
    """`(skeleton, {key: tensor}, {key: path})`; see the module docstring."""
    tensors: dict[str, torch.Tensor] = {}
    paths: dict[str, Path_] = {}

    def walk(obj: Any, path: Path_) -> Any:
        if isinstance(obj, torch.Tensor):
            key = _key(path)
            n = 1
            while key in tensors:
                key, n = f"{_key(path)}#{n}", n + 1
            tensors[key] = obj
            paths[key] = list(path)
            return None
        if isinstance(obj, dict):
            items = [(k, walk(v, [*path, k])) for k, v in obj.items()]
            return OrderedDict(items) if isinstance(obj, OrderedDict) else dict(items)
        if isinstance(obj, list):
            return [walk(v, [*path, i]) for i, v in enumerate(obj)]
        if isinstance(obj, tuple):
            return tuple(walk(v, [*path, i]) for i, v in enumerate(obj))
        return obj

    return walk(payload, []), tensors, paths


def join_payload(skeleton: Any, paths: dict[str, Path_], tensors: dict[str, torch.Tensor]) -> Any:
    """The payload `split_payload` split; every path must lead to a `None` of the skeleton."""
    by_path = {tuple(path): tensors[key] for key, path in paths.items()}
    if len(by_path) != len(paths):
        raise ValueError("two tensors of the sharded checkpoint claim the same place in its payload")
    placed: set[tuple[Any, ...]] = set()

    def walk(obj: Any, path: tuple[Any, ...]) -> Any:
        if path in by_path:
            if obj is not None:
                raise ValueError(f"the tensor at {list(path)} replaces a value of the payload")
            placed.add(path)
            return by_path[path]
        if isinstance(obj, dict):
            items = [(k, walk(v, (*path, k))) for k, v in obj.items()]
            return OrderedDict(items) if isinstance(obj, OrderedDict) else dict(items)
        if isinstance(obj, list):
            return [walk(v, (*path, i)) for i, v in enumerate(obj)]
        if isinstance(obj, tuple):
            return tuple(walk(v, (*path, i)) for i, v in enumerate(obj))
        return obj

    result = walk(skeleton, ())
    missing = set(by_path) - placed
    if missing:
        raise ValueError(f"the payload has no place for the tensor at {list(next(iter(missing)))}")
    return result
