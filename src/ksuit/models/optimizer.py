"""The optimizer a trainable model owns."""

from __future__ import annotations

from typing import Any

import torch

from ksuit.schemas.models import OptimizerConfig
from ksuit.utils.imports import resolve_import_path


class OptimizerWrapper:
    """A torch optimizer built from an `OptimizerConfig`, or one the caller built
    (`OptimizerWrapper.of`, what `ksuit.models.wrap` uses; `config` is then None).

    `state_dict()` is exactly the torch optimizer's state dict, so optimizer files hold nothing
    ksuit-specific and load with plain `torch.load(weights_only=True)`.
    """

    config: OptimizerConfig | None

    def __init__(self, parameters: list[torch.nn.Parameter], config: OptimizerConfig):
        optim_cls = resolve_import_path(config.kind, what="optimizer kind")
        if not (isinstance(optim_cls, type) and issubclass(optim_cls, torch.optim.Optimizer)):
            raise TypeError(f"optimizer kind {config.kind!r} is not a torch.optim.Optimizer subclass")
        self.config = config
        try:
            self.torch_optim: torch.optim.Optimizer = optim_cls(parameters, **config.kwargs)
        except TypeError as e:
            raise TypeError(f"optimizer {config.kind} rejected its arguments {config.kwargs}: {e}") from e

    @classmethod
    def of(cls, optimizer: torch.optim.Optimizer) -> OptimizerWrapper:
        """Wraps a torch optimizer the caller built (and keeps stepping themselves)."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer (e.g. torch.optim.AdamW(module.parameters())), "
                f"got {type(optimizer).__name__}"
            )
        wrapper = cls.__new__(cls)
        wrapper.config = None
        wrapper.torch_optim = optimizer
        return wrapper

    def step(self, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        if grad_scaler is None:
            self.torch_optim.step()
        else:
            grad_scaler.step(self.torch_optim)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.torch_optim.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.torch_optim.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.torch_optim.load_state_dict(state_dict)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.torch_optim.param_groups
