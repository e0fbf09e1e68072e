"""Models: leaf `Model`s with optimizers and `CompositeModel` trees of them."""

from ksuit.models.base import CompositeModel, Model, ModelBase
from ksuit.models.optimizer import OptimizerWrapper

__all__ = ["CompositeModel", "Model", "ModelBase", "OptimizerWrapper"]
