"""Pydantic configs."""

from ksuit.schemas.models import ModelBaseConfig, OptimizerConfig

__all__ = ["ModelBaseConfig", "OptimizerConfig"]
