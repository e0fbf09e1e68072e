"""Payloads: the dict of a weights file, and the checks that a payload holds only what
`torch.load(weights_only=True)` reads back."""

from __future__ import annotations

import logging
import math
import numbers
from collections import OrderedDict
from typing import Any

import torch

from ksuit.schemas.models import ModelBaseConfig
from ksuit.storage.manifest import MAX_METRIC_NAME, MAX_METRICS

logger = logging.getLogger(__name__)

# keys of a weights file ksuit fills in itself; `extra` may not set them
RESERVED_EXTRA = frozenset({"training_iteration", "run_id", "config_kind"})

_PLAIN = (str, int, float, bool, type(None), torch.Size, torch.dtype, torch.device)


def check_plain(obj: Any, where: str) -> None:
    """Raises TypeError naming the first value that is not a tensor or plain Python value."""
    if isinstance(obj, torch.Tensor) or isinstance(obj, _PLAIN):
        return
    if isinstance(obj, (dict, OrderedDict)):
        Tensor = torch.Tensor
        for key, value in obj.items():
            if type(key) is not str and (not isinstance(key, (str, int)) or isinstance(key, bool)):
                raise TypeError(
                    f"{where} has a key {key!r} of type {type(key).__name__}; keys must be str "
                    "(or int, as in optimizer state) so the file loads with weights_only=True"
                )
            if type(value) is not Tensor:  # a state dict's values: no call per tensor
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


def check_metrics(metrics: Any) -> dict[str, float] | None:
    """The metrics a save records in its manifests (`None` or empty: none): names are non-empty
    str of at most `MAX_METRIC_NAME` characters, at most `MAX_METRICS` of them, values int or
    float. Non-finite values (a NaN loss) are left out with a warning: the save goes on, and no
    `keep_best` ever keeps a set for a NaN."""
    if metrics is None:
        return None
    if not isinstance(metrics, dict):
        raise TypeError(f"metrics must be a dict of str -> float, got {type(metrics).__name__}")
    if len(metrics) > MAX_METRICS:
        raise ValueError(f"at most {MAX_METRICS} metrics can be recorded with a save, got {len(metrics)}")
    recorded: dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not 0 < len(key) <= MAX_METRIC_NAME:
            raise ValueError(
                f"metric name {str(key)[:100]!r} must be a non-empty str of at most {MAX_METRIC_NAME} "
                "characters"
            )
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"metric {key!r} must be a float, got {type(value).__name__}")
        value = float(value)
        if not math.isfinite(value):
            logger.warning("metric %r is %s: not recorded with the checkpoint", key, value)
            continue
        recorded[key] = value
    return recorded or None
