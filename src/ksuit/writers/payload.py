"""Checks that a payload holds only what `torch.load(weights_only=True)` reads back."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

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
