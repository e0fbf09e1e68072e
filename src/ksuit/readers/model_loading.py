"""Rebuilding a model from one weights file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ksuit.models.base import ModelBase
from ksuit.schemas.models import ModelBaseConfig
from ksuit.storage.loading import load_file
from ksuit.utils.imports import resolve_import_path


def load_model_payload(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    payload = load_file(path, map_location=map_location)
    if not isinstance(payload, dict) or "state_dict" not in payload:
        raise ValueError(f"{path} is not a ksuit weights file (no 'state_dict' key); pass a *_model.th file")
    return payload


def build_model_from_payload(payload: dict[str, Any], source: str) -> ModelBase:
    """The model (not yet loaded) described by a weights payload's config keys."""
    if "model_config" not in payload or "config_kind" not in payload:
        raise ValueError(
            f"{source} carries no model_config/config_kind, so the model cannot be rebuilt from it; "
            "build the model yourself and load payload['state_dict']"
        )
    try:
        config_cls = resolve_import_path(payload["config_kind"], what="config class")
    except ImportError as e:
        raise ImportError(f"cannot rebuild the model of {source}: {e}") from e
    if not (isinstance(config_cls, type) and issubclass(config_cls, ModelBaseConfig)):
        raise TypeError(f"{source}: config_kind {payload['config_kind']!r} is not a ModelBaseConfig subclass")
    config = config_cls.model_validate(payload["model_config"])
    try:
        model_cls = resolve_import_path(config.kind, what="model class")
    except ImportError as e:
        raise ImportError(f"cannot rebuild the model of {source}: {e}") from e
    if not (isinstance(model_cls, type) and issubclass(model_cls, ModelBase)):
        raise TypeError(f"{source}: model kind {config.kind!r} is not a ksuit ModelBase subclass")
    return model_cls(model_config=config)


def load_model(path: str | Path, map_location: Any = "cpu") -> ModelBase:
    """Rebuilds the model a weights file describes, loads its weights, returns it in eval mode.

    The config class comes from `config_kind`, the model class from the config's `kind`.
    """
    payload = load_model_payload(path, map_location)
    model = build_model_from_payload(payload, str(path))
    model.load_state_dict(payload["state_dict"])
    if map_location is not None and isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model.eval()
