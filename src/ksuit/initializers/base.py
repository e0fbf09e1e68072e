"""What initializers share: `apply(trainer)` and how a checkpoint is named on the command line."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from ksuit.layout import validate_tag
from ksuit.utils.training import TrainingIteration

if TYPE_CHECKING:
    from ksuit.trainers.base import BaseTrainer

_SPEC_PART = re.compile(r"^(epoch|update|sample)=(\d+)$")


class Initializer(ABC):
    """Loads state into a set-up trainer (model on its device, optimizers built) before training."""

    @abstractmethod
    def apply(self, trainer: BaseTrainer) -> None: ...


def parse_checkpoint_spec(value: Any) -> str | TrainingIteration | None:
    """A checkpoint as a tag (`latest`, `last`, `best_model.loss.val`, `E10_U230_S14720`) or as a
    minimal iteration (`epoch=10`, `E10`, `update=200`, `{"epoch": 10}`); None stays None."""
    if value is None or isinstance(value, TrainingIteration):
        return value
    if isinstance(value, dict):
        return TrainingIteration.from_dict(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"a checkpoint is a tag or a spec such as 'epoch=10', got {value!r}")
    value = value.strip()
    if "=" in value:
        fields = {}
        for part in value.replace(",", " ").split():
            match = _SPEC_PART.match(part)
            if match is None:
                raise ValueError(
                    f"cannot read checkpoint spec {value!r}: "
                    "expected epoch=N, update=N or sample=N (e.g. epoch=10)"
                )
            fields[match[1]] = int(match[2])
        return TrainingIteration(**fields)
    try:
        it = TrainingIteration.from_string(value)
    except ValueError:
        return validate_tag(value)
    return value if it.is_fully_specified else it


def describe_spec(spec: str | TrainingIteration | None) -> str:
    if spec is None:
        return "the newest usable checkpoint"
    if isinstance(spec, TrainingIteration):
        return ", ".join(f"{k}={v}" for k, v in spec)
    return f"'{spec}'"
