"""Rebuilding a model from one weights file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ksuit.models.base import ModelBase
from ksuit.schemas.models import ModelBaseConfig
from ksuit.storage.formats import format_of_path
from ksuit.storage.loading import load_file
from ksuit.utils.imports import resolve_import_path


def load_model_payload(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    payload = load_file(path, map_location=map_location, mmap=mmap)
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
    # .th files are memory-mapped and their tensors become the parameters (no second copy) when
    # that gives the same model as copying: same shapes and dtypes, no tied weights
    payload = load_model_payload(path, map_location, mmap=format_of_path(path) == "torch")
    model = build_model_from_payload(payload, str(path))
    state_dict = payload["state_dict"]
    model.load_state_dict(state_dict, assign=_can_assign(model, state_dict))
    if map_location is not None and isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model.eval()


def _can_assign(model: ModelBase, state_dict: dict[str, Any]) -> bool:
    """Whether `load_state_dict(assign=True)` yields the same model as copying would."""
    own = model.state_dict()
    if set(own) != set(state_dict):
        return False  # let the copying path raise its usual missing/unexpected-keys error
    storages = set()
    for key, mine in own.items():
        theirs = state_dict[key]
        if not isinstance(theirs, torch.Tensor) or theirs.shape != mine.shape or theirs.dtype != mine.dtype:
            return False
        ptr = mine.untyped_storage().data_ptr()
        if ptr and ptr in storages:
            return False  # tied weights: assigning would untie them
        storages.add(ptr)
    return True
