"""One optimizer update: forward and backward over `accumulation_steps` batches, then a step.

Mixed precision (autocast, and a GradScaler for float16), DDP's gradient sync on the last
accumulation step only, gradient clipping, and `split_loss`, which checks what `loss()` returned.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ksuit.trainers.base import BaseTrainer


def split_loss(out: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`loss()`'s result as `(total, {part: value})`; refuses anything but a scalar tensor or a
    dict of scalar tensors with 'total'."""
    if isinstance(out, torch.Tensor):
        if out.numel() != 1:
            raise ValueError(f"loss() returned a tensor of shape {tuple(out.shape)}; return a scalar")
        return out.reshape(()), {}
    if isinstance(out, dict):
        if "total" not in out:
            raise KeyError(f"loss() returned a dict without 'total' (keys: {', '.join(map(str, out))})")
        parts = {str(k): v for k, v in out.items() if k != "total"}
        return out["total"].reshape(()), parts
    raise TypeError(f"loss() must return a scalar tensor or a dict with 'total', got {type(out).__name__}")


def optimizer_update(
    trainer: BaseTrainer, train_model: torch.nn.Module, batches: Iterator[Any]
) -> dict[str, torch.Tensor]:
    """One update of `trainer.model` from the next `accumulation_steps` batches; returns the
    detached losses (`{"total": ..., <part>: ...}`), each the mean over the steps."""
    totals: dict[str, torch.Tensor] = {}
    steps = trainer.accumulation_steps
    scaler, ddp_model = trainer.grad_scaler, trainer.ddp_model
    for step in range(steps):
        batch = trainer.to_device(next(batches))
        last = step == steps - 1
        sync = contextlib.nullcontext() if last or ddp_model is None else ddp_model.no_sync()
        with sync:
            with trainer.autocast():
                out = trainer.loss(train_model, batch)
            total, parts = split_loss(out)
            scaled = total / steps if steps > 1 else total
            # torch.autograd.backward(t) is t.backward(), with annotations a type checker can use
            torch.autograd.backward(scaler.scale(scaled) if scaler is not None else scaled)
        for key, value in {"total": total, **parts}.items():
            value = value.detach().float() / steps
            totals[key] = totals[key] + value if key in totals else value
    optimizers = trainer.optimizers
    if trainer.clip_grad_norm is not None:
        if scaler is not None:
            for optim in optimizers:
                scaler.unscale_(optim.torch_optim)
        params = [p for p in trainer.model.parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, trainer.clip_grad_norm)
    for optim in optimizers:
        optim.step(scaler)
    if scaler is not None:
        scaler.update()
    for optim in optimizers:
        optim.zero_grad()
    return totals
