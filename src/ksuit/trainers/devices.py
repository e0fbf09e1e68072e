"""Where the trainer computes and in which precision: device choice, autocast, moving batches."""

from __future__ import annotations

import contextlib
import os
import typing
from typing import Any

import torch

from ksuit.schemas.trainer import Device, Precision

PRECISION_DTYPES: dict[str, torch.dtype | None] = {
    "float32": None,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
assert set(PRECISION_DTYPES) == set(typing.get_args(Precision)), "a precision without its dtype"


def resolve_device(device: Device, world_size: int) -> torch.device:
    """The torch device for a `device` setting: "auto" is CUDA when available; under torchrun
    (world size > 1) each process uses `cuda:<LOCAL_RANK>`."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                "device 'cuda' was requested but CUDA is not available; use device: cpu or auto"
            )
        index = int(os.environ.get("LOCAL_RANK", "0")) if world_size > 1 else torch.cuda.current_device()
        return torch.device("cuda", index)
    return torch.device("cpu")


def wrap_ddp(
    model: torch.nn.Module, device: torch.device, world_size: int
) -> torch.nn.parallel.DistributedDataParallel | None:
    """`model` in DistributedDataParallel when there are several processes and something to
    train; None otherwise (then the model itself runs the forward pass)."""
    if world_size == 1 or not any(p.requires_grad for p in model.parameters()):
        return None
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def shard_leaves(model: torch.nn.Module, device: torch.device) -> bool:
    """Applies FSDP2 `fully_shard` to every leaf model of a ksuit model (each its own unit, over
    one mesh of all ranks): parameters become DTensors, each rank holding its shard. Returns
    whether it sharded (it needs torch.distributed; alone in a process the model stays plain)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    leaves = [leaf for _, leaf in model.iter_leaves()]  # type: ignore[operator]
    for leaf in leaves:
        if any(True for _ in leaf.parameters()):
            fully_shard(leaf, mesh=mesh)
    if all(leaf is not model for leaf in leaves):
        # a composite root over the leaves: the leaves then reshard after each forward pass
        fully_shard(model, mesh=mesh)
    return True


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The autocast context of `precision` on `device` (nothing for float32)."""
    dtype = PRECISION_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def move_to_device(batch: Any, device: torch.device) -> Any:
    """`batch` with every tensor moved to `device` (lists, tuples, namedtuples and dicts walked)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, dict):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch
