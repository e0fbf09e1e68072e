"""How much snapshot memory the saves of a model will take, known before its first save.

`CheckpointWriter.prepare` readies that much host memory in the background. The weights are
known at once; optimizer state is usually created by the first `step()`, after the trainer's set-up,
so where a parameter has none yet it is estimated from the optimizer's class (torch's own
optimizers: how many tensors of the parameter's size each keeps per parameter). An unknown
optimizer class counts nothing it does not already hold: its state is then mapped by the first
save itself (slower, never more memory than that save needs).
"""

from __future__ import annotations

from typing import Any

import torch

from ksuit.models.base import ModelBase
from ksuit.models.selection import select_leaves

ALIGNMENT = 64
TRAINER_STATE_BYTES = 64 << 10  # RNG states and counters of the trainer file

# per parameter, by torch.optim class name: (tensors of the parameter's size, scalar tensors)
_STATE = {
    "Adam": (2, 1),
    "AdamW": (2, 1),
    "NAdam": (2, 2),
    "RAdam": (2, 1),
    "Adamax": (2, 1),
    "Adadelta": (2, 1),
    "Rprop": (2, 1),
    "SparseAdam": (2, 1),
    "Adagrad": (1, 1),
    "ASGD": (1, 3),
    "RMSprop": (1, 1),
    "SGD": (0, 0),
}


def _aligned(t: torch.Tensor) -> int:
    return (t.numel() * t.element_size() + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def state_shape(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> tuple[int, int] | None:
    """`(tensors of a parameter's size, scalar tensors)` that `optimizer` keeps per parameter of
    `group` once it has stepped; None for a class it does not know."""
    for cls in type(optimizer).__mro__:
        known = _STATE.get(cls.__name__)
        if known is None or not cls.__module__.startswith("torch.optim"):
            continue
        full, scalars = known
        if cls.__name__ in ("Adam", "AdamW") and group.get("amsgrad"):
            full += 1
        if cls.__name__ == "RMSprop":
            full += bool(group.get("momentum")) + bool(group.get("centered"))
        if cls.__name__ == "SGD":
            full += bool(group.get("momentum"))
        return full, scalars
    return None


def optimizer_state_nbytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes the tensors of `optimizer.state_dict()` take once every parameter has stepped
    (each rounded up to 64, as the snapshot lays them out)."""
    total = 0
    for group in optimizer.param_groups:
        shape = state_shape(optimizer, group)
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state:
                total += sum(_aligned(v) for v in state.values() if isinstance(v, torch.Tensor))
            elif shape is not None and p.requires_grad:
                total += shape[0] * _aligned(p) + shape[1] * ALIGNMENT
    return total


def snapshot_nbytes(model: ModelBase) -> tuple[int, bool]:
    """`(bytes, any CUDA tensor)` a save of the weights, optimizer states and trainer state of
    every leaf of `model` snapshots (a save of those under two tags holds them once)."""
    total, cuda = TRAINER_STATE_BYTES, False
    for _, leaf in select_leaves(model, None):
        for t in leaf.state_dict().values():
            if isinstance(t, torch.Tensor):
                total += _aligned(t)
                cuda = cuda or t.device.type == "cuda"
        if leaf.optimizer is not None:
            total += optimizer_state_nbytes(leaf.optimizer.torch_optim)
    return total, cuda
