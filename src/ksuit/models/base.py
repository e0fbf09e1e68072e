"""Models: `ModelBase` is what the writer and trainer see; `Model` is a leaf with parameters
and an optimizer; `CompositeModel` is a tree of named submodels.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from ksuit.models.optimizer import OptimizerWrapper
from ksuit.schemas.models import ModelBaseConfig

if TYPE_CHECKING:
    from ksuit.providers import PathProvider
    from ksuit.utils.training import UpdateCounter


class ModelBase(nn.Module, metaclass=ABCMeta):
    """Common part of every ksuit model: a config, a name, frozen-ness and an optimizer."""

    def __init__(
        self,
        model_config: ModelBaseConfig,
        is_frozen: bool = False,
        update_counter: UpdateCounter | None = None,
        path_provider: PathProvider | None = None,
    ):
        super().__init__()
        if not isinstance(model_config, ModelBaseConfig):
            raise TypeError(
                "model_config must be a ModelBaseConfig (or subclass) instance, "
                f"got {type(model_config).__name__}"
            )
        self.model_config = model_config
        self.is_frozen = bool(is_frozen)
        self.update_counter = update_counter
        self.path_provider = path_provider
        self._optimizer: OptimizerWrapper | None = None
        self._is_initialized = False

    @property
    def name(self) -> str:
        return self.model_config.name

    @property
    def optimizer(self) -> OptimizerWrapper | None:
        return self._optimizer

    @property
    def is_initialized(self) -> bool:
        return self._is_initialized

    @abstractmethod
    def initialize(self) -> ModelBase:
        """Freezes or builds the optimizer; returns self."""

    def iter_leaves(self, prefix: str | None = None) -> Iterator[tuple[str, Model]]:
        """`(file name, leaf model)` for every leaf, composites named `<composite>.<key>`."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> ModelBase:
        # frozen models stay in eval mode whatever the trainer asks
        super().train(mode and not self.is_frozen)
        if self.is_frozen:
            for module in self.modules():
                module.training = False
        return self


class Model(ModelBase):
    """A leaf model: owns parameters and, unless frozen, an optimizer built from its config."""

    def initialize(self) -> Model:
        if self.is_frozen:
            self.requires_grad_(False)
            self.eval()
            self._optimizer = None
        elif self.model_config.optimizer_config is not None:
            params = [p for p in self.parameters() if p.requires_grad]
            if not params:
                raise ValueError(
                    f"model '{self.name}' has an optimizer_config but no trainable parameters; "
                    "remove optimizer_config or mark it frozen"
                )
            self._optimizer = OptimizerWrapper(params, self.model_config.optimizer_config)
        self._is_initialized = True
        return self

    def iter_leaves(self, prefix: str | None = None) -> Iterator[tuple[str, Model]]:
        yield (prefix if prefix is not None else self.name), self


class CompositeModel(ModelBase):
    """A model made of named submodels (which may be composites themselves).

    Subclasses create their submodels in `__init__` and return them from `submodels`;
    a None entry is an optional part that is absent.
    """

    @property
    @abstractmethod
    def submodels(self) -> dict[str, ModelBase | None]:
        """Named submodels; file names of their checkpoints are `<composite name>.<key>`."""

    def _present_submodels(self) -> dict[str, ModelBase]:
        result = {}
        for key, sub in self.submodels.items():
            if sub is None:
                continue
            if not isinstance(sub, ModelBase):
                raise TypeError(
                    f"submodel '{key}' of '{self.name}' is a {type(sub).__name__}; submodels must be "
                    "ksuit Model or CompositeModel instances"
                )
            result[key] = sub
        return result

    def initialize(self) -> CompositeModel:
        for sub in self._present_submodels().values():
            if self.is_frozen:
                sub.is_frozen = True
            sub.initialize()
        if self.is_frozen:
            self.requires_grad_(False)
            self.eval()
        self._is_initialized = True
        return self

    @property
    def optimizer(self) -> None:
        """Composites have no optimizer of their own; each submodel has one."""
        return None

    def iter_leaves(self, prefix: str | None = None) -> Iterator[tuple[str, Model]]:
        own = prefix if prefix is not None else self.name
        for key, sub in self._present_submodels().items():
            yield from sub.iter_leaves(f"{own}.{key}")

    def iter_submodels(self, prefix: str | None = None) -> Iterator[tuple[str, str, ModelBase]]:
        """`(key path, file name, model)` for every submodel at every depth, parents first."""
        own = prefix if prefix is not None else self.name
        for key, sub in self._present_submodels().items():
            yield key, f"{own}.{key}", sub
            if isinstance(sub, CompositeModel):
                for sub_key, full, model in sub.iter_submodels(f"{own}.{key}"):
                    yield f"{key}.{sub_key}", full, model


def require_ksuit_model(model: object) -> None:
    """Refuses anything but a ksuit `ModelBase`; DDP and torch.compile wrappers get an error
    saying how to pass the ksuit model they wrap."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise TypeError(
            "got a DistributedDataParallel-wrapped model; pass the ksuit model itself (ddp_model.module) "
            "so checkpoint keys carry no 'module.' prefix"
        )
    if type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
        raise TypeError(
            "got a torch.compile-wrapped model; pass the original ksuit model (compiled._orig_mod)"
        )
    if not isinstance(model, ModelBase):
        hint = (
            "; for a plain torch module use ksuit.models.wrap(module, name, optimizer=...)"
            if isinstance(model, torch.nn.Module)
            else ""
        )
        raise TypeError(
            f"model must be a ksuit ModelBase (Model or CompositeModel), got {type(model).__name__}{hint}"
        )


# the old name; ksuit.writers still imports it (to be switched to require_ksuit_model, then removed)
