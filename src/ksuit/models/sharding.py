"""Whether a model's state is sharded over ranks (DTensor parameters, e.g. FSDP2 `fully_shard`)."""

from __future__ import annotations

import torch


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether `module`'s state dict holds DTensors: its weights and optimizer state are then
    saved by every rank as a sharded checkpoint and loaded resharded to the ranks of the run.
    (Its state dict, not its parameters: FSDP2 swaps unsharded plain tensors in between a
    forward pass and the next reshard.) Taken with `keep_vars=True`: the same tensors, without a
    detached copy of each (a save calls this for every leaf)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(t, DTensor) for t in module.state_dict(keep_vars=True).values())
