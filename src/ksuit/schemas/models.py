"""Model and optimizer configs.

A model config is enough to rebuild the model: `kind` names the model class, the config class
itself is recorded in checkpoints as `config_kind`, and both are plain import paths. Read back
from a file, they only name classes of modules already imported or trusted by the caller
(`ksuit.load_model(..., trusted_modules=...)`); a file never chooses a module to import.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from ksuit.layout import validate_name
from ksuit.utils.imports import import_path


class OptimizerConfig(BaseModel):
    """`kind` is a torch optimizer's import path; every other key is passed to it.

    Example: `{"kind": "torch.optim.AdamW", "lr": 1e-3, "weight_decay": 0.05}`.
    """

    model_config = ConfigDict(extra="allow")

    kind: str = "torch.optim.AdamW"

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @field_validator("kind")
    @classmethod
    def _check_kind(cls, value: str) -> str:
        if "." not in value:
            raise ValueError(f"optimizer kind {value!r} must be an import path such as 'torch.optim.AdamW'")
        return value


class ModelBaseConfig(BaseModel):
    """Base of every model config. Subclasses add fields, and may nest configs of submodels."""

    model_config = ConfigDict(extra="forbid")

    kind: str
    name: str
    optimizer_config: OptimizerConfig | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return validate_name(value)

    @field_validator("kind")
    @classmethod
    def _check_kind(cls, value: str) -> str:
        if "." not in value:
            raise ValueError(f"model kind {value!r} must be an import path such as 'mypkg.models.Encoder'")
        return value

    @property
    def config_kind(self) -> str:
        """`module.QualName` of this config class, stored in checkpoints to rebuild the config."""
        return import_path(self)
