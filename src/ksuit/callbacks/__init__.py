"""Callbacks: periodic work around training updates, each with state that survives resume."""

from ksuit.callbacks.base import Callback, PeriodicCallback
from ksuit.callbacks.checkpoint import BestCheckpointCallback, CheckpointCallback
from ksuit.callbacks.ema import EmaCallback
from ksuit.callbacks.progress import ProgressBarCallback
from ksuit.callbacks.validation import ValidationLossCallback

# short names usable as `kind` in a run config
CALLBACK_KINDS: dict[str, type[Callback]] = {
    "checkpoint": CheckpointCallback,
    "best_checkpoint": BestCheckpointCallback,
    "ema": EmaCallback,
    "validation_loss": ValidationLossCallback,
}

__all__ = [
    "CALLBACK_KINDS",
    "BestCheckpointCallback",
    "Callback",
    "CheckpointCallback",
    "EmaCallback",
    "PeriodicCallback",
    "ProgressBarCallback",
    "ValidationLossCallback",
]
