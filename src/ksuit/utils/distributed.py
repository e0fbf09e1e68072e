"""torch.distributed helpers: who we are, and the few collectives training needs.

Every function works without an initialized process group (then there is one rank, rank 0),
so single-process code paths need no branches. A domain utility: it imports only torch, so
every layer (writers, callbacks, trainers) may use it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank(group: Any = None) -> int:
    """This process's rank in `group` (the default group when None)."""
    return dist.get_rank(group) if is_distributed() else 0


def world_size(group: Any = None) -> int:
    """The number of processes of `group` (the default group when None)."""
    return dist.get_world_size(group) if is_distributed() else 1


def is_rank0() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    """Whether the environment of `torchrun` (or `python -m torch.distributed.run`) is present."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ and "MASTER_ADDR" in os.environ


INIT_METHOD_ENV = "KSUIT_INIT_METHOD"


def init_from_env(device_type: str) -> bool:
    """Initializes the default process group from torchrun's environment; returns whether it did.

    gloo on CPU, nccl on CUDA. Does nothing when not launched by torchrun or already initialized.
    The ranks meet through torchrun's store, or, when `KSUIT_INIT_METHOD` is set (e.g.
    `file:///shared/run/rendezvous`, a file on a file system every rank sees), through that
    init method: no port to agree on.
    """
    if is_distributed() or not launched_by_torchrun():
        return False
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    init_method = os.environ.get(INIT_METHOD_ENV)
    if init_method:
        dist.init_process_group(
            backend=backend,
            init_method=init_method,
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
        )
    else:
        dist.init_process_group(backend=backend)
    return True


def all_gather_object(obj: Any) -> list[Any]:
    """`[obj of rank 0, obj of rank 1, ...]`; `[obj]` without a process group."""
    if not is_distributed():
        return [obj]
    result: list[Any] = [None] * world_size()
    dist.all_gather_object(result, obj)
    return result


def broadcast_object(obj: Any, src: int = 0, group: Any = None) -> Any:
    """Rank `src`'s `obj` on every rank (of `group`, whose rank `src` it is, when given)."""
    if not is_distributed():
        return obj
    box = [obj]
    if group is None:
        dist.broadcast_object_list(box, src=src)
    else:
        dist.broadcast_object_list(box, group=group, group_src=src)
    return box[0]


def all_reduce_max_int(value: int, device: torch.device | str = "cpu") -> int:
    """The largest `value` over all ranks (e.g. a stop flag every rank must agree on)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_collective_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_reduce_sum(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Element-wise sums over all ranks, in float64."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def _collective_device(device: torch.device | str) -> torch.device:
    # nccl only reduces CUDA tensors, gloo reduces CPU tensors
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
