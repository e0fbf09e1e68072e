"""Payloads: the dict of a weights file, and the checks that a payload holds only what
`torch.load(weights_only=True)` reads back."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from ksuit.schemas.models import ModelBaseConfig

# keys of a weights file ksuit fills in itself; `extra` may not set them
RESERVED_EXTRA = frozenset({"training_iteration", "run_id", "config_kind"})

_PLAIN = (str, int, float, bool, type(None), torch.Size, torch.dtype, torch.device)


def check_plain(obj: Any, where: str) -> None:
    """Raises TypeError naming the first value that is not a tensor or plain Python value."""
    if isinstance(obj, torch.Tensor) or isinstance(obj, _PLAIN):
        return
    if isinstance(obj, (dict, OrderedDict)):
        for key, value in obj.items():
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise TypeError(
                    f"{where} has a key {key!r} of type {type(key).__name__}; keys must be str "
                    "(or int, as in optimizer state) so the file loads with weights_only=True"
                )
            check_plain(value, f"{where}[{key!r}]")
        return
    if type(obj) in (list, tuple):
        for i, value in enumerate(obj):
            check_plain(value, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} holds a {type(obj).__module__}.{type(obj).__qualname__}; checkpoints may hold only tensors "
        "and plain Python values (dict, list, tuple, str, int, float, bool, None) so that they load with "
        "torch.load(weights_only=True). Convert it (e.g. to a dict or a tensor) before saving"
    )


def check_state_dict(state_dict: Any, where: str = "state_dict") -> None:
    if not isinstance(state_dict, dict):
        raise TypeError(
            f"{where} must be a dict of str -> tensor (e.g. model.state_dict()), "
            f"got {type(state_dict).__name__}"
        )
    for key in state_dict:
        if not isinstance(key, str):
            raise TypeError(f"{where} key {key!r} is a {type(key).__name__}; state dict keys must be str")
    check_plain(state_dict, where)


def model_payload(
    state_dict: dict[str, Any],
    checkpoint_tag: str,
    training_iteration: dict[str, int],
    run_id: str,
    model_config: ModelBaseConfig | None,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The dict of a weights file: `{state_dict, checkpoint_tag, training_iteration, run_id,
    model_config, config_kind, **extra}` (keys of `ksuit.writers.CheckpointKeys`), checked to
    hold only tensors and plain values."""
    check_state_dict(state_dict)
    reserved = sorted(k for k in extra if k in RESERVED_EXTRA)
    if reserved:
        raise ValueError(f"extra keys {reserved} are reserved: ksuit fills them in itself")
    check_plain(extra, "extra")
    payload: dict[str, Any] = {
        "state_dict": state_dict,
        "checkpoint_tag": checkpoint_tag,
        "training_iteration": dict(training_iteration),
        "run_id": run_id,
    }
    if model_config is not None:
        if not isinstance(model_config, ModelBaseConfig):
            raise TypeError(
                f"model_config must be a ModelBaseConfig instance, got {type(model_config).__name__}"
            )
        try:
            payload["model_config"] = model_config.model_dump(mode="json")
        except Exception as e:
            raise RuntimeError(f"could not serialize model_config of '{model_config.name}': {e}") from e
        payload["config_kind"] = model_config.config_kind
    payload.update({str(k): v for k, v in extra.items()})
    return payload
