"""Models: leaf `Model`s with optimizers and `CompositeModel` trees of them; `wrap` makes a
ksuit model of a plain `nn.Module` (and the optimizer you built)."""

from ksuit.models.base import CompositeModel, Model, ModelBase
from ksuit.models.optimizer import OptimizerWrapper
from ksuit.models.wrapped import WrappedComposite, WrappedModel, WrappedModuleConfig, wrap

__all__ = [
    "CompositeModel",
    "Model",
    "ModelBase",
    "OptimizerWrapper",
    "WrappedComposite",
    "WrappedModel",
    "WrappedModuleConfig",
    "wrap",
]
