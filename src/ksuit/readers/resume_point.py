"""`ResumePoint`: which checkpoint set a resumed run continues from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ksuit.utils.training import TrainingIteration


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run continues from: the checkpoint folder, the set's tag and iteration.

    `ResumeInitializer` sets it on the trainer (`trainer.resumed_from`); callbacks that keep
    files of their own (EMA) read it to reload theirs from the same set.
    """

    checkpoint_dir: Path | str  # a Path for local runs, else the URL
    tag: str
    training_iteration: TrainingIteration
