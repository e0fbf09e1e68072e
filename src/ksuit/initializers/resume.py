"""`ResumeInitializer`: continue a run from one of its checkpoint sets, exactly."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ksuit.initializers.base import Initializer, describe_spec, parse_checkpoint_spec
from ksuit.readers import (
    CheckpointSet,
    ResumePoint,
    find_checkpoint_dir,
    load_resume_set,
    select_resume_set,
)

if TYPE_CHECKING:
    from ksuit.trainers.base import BaseTrainer

logger = logging.getLogger(__name__)


class ResumeInitializer(Initializer):
    """Restores weights, optimizer states, the trainer state (counter, callbacks, grad scaler,
    every rank's RNG, data position) and, through the callbacks, EMA weights.

    Args:
        run_dir: the run folder (`<output>/<run_id>`) or its checkpoint folder.
        checkpoint: `None` (the newest usable set, preferring `latest` on a tie), a tag
            (`latest`, `last`, `E10_U230_S14720`) or a minimal spec (`epoch=10`, `E10`,
            `{"epoch": 10}`) resolved from the file names. Only complete sets whose files match
            their manifest and that hold the trainer file, every weights file and every optimizer
            state are used; the others are skipped and logged with the reason.
        strict: refuse callback states that do not match the run's callbacks by name.
    """

    def __init__(self, run_dir: str | Path, checkpoint: Any = None, strict: bool = True):
        self.run_dir = Path(run_dir)
        self.checkpoint = parse_checkpoint_spec(checkpoint)
        self.strict = strict
        self.chosen: CheckpointSet | None = None
        self.skipped: list[tuple[str, str]] = []

    def required_files(self, trainer: BaseTrainer) -> list[tuple[str, str]]:
        required = []
        for name, leaf in trainer.model.iter_leaves():
            if not leaf.is_frozen:
                required.append((name, "model"))
            if leaf.optimizer is not None:
                required.append((name, "optim"))
        return required

    def select(self, trainer: BaseTrainer) -> CheckpointSet:
        """The set a resume would start from (every file checked against its manifest), without
        loading it; `apply` chooses the same set and loads it in the same pass."""
        folder = find_checkpoint_dir(self.run_dir)
        chosen, skipped = select_resume_set(
            folder, trainer.model.name, self.checkpoint, self.required_files(trainer)
        )
        self._chose(trainer, chosen, skipped)
        return chosen

    def _chose(self, trainer: BaseTrainer, chosen: CheckpointSet, skipped: list[tuple[str, str]]) -> None:
        self.chosen, self.skipped = chosen, skipped
        if trainer.rank == 0:
            for tag, reason in skipped:
                logger.warning("skipped checkpoint '%s': %s", tag, reason)
            logger.info(
                "resuming from checkpoint '%s' (%s) in %s, asked for %s",
                chosen.tag,
                chosen.training_iteration,
                chosen.folder.location,
                describe_spec(self.checkpoint),
            )

    def apply(self, trainer: BaseTrainer) -> None:
        """Chooses the set and loads it in one pass (`ksuit.readers.load_resume_set`: each file
        read once, checked against its manifest from the bytes loaded), then restores the model,
        the optimizers and the trainer from it."""
        group = trainer.model.name
        wanted = [(group, "trainer")]
        for name, leaf in trainer.model.iter_leaves():
            wanted.append((name, "model"))
            if leaf.optimizer is not None:
                wanted.append((name, "optim"))
        loaded = load_resume_set(
            find_checkpoint_dir(self.run_dir), group, self.checkpoint, self.required_files(trainer), wanted
        )
        chosen, payloads = loaded.chosen, loaded.payloads
        self._chose(trainer, chosen, loaded.skipped)
        for name, leaf in trainer.model.iter_leaves():
            weights = payloads.get((name, "model"))
            if weights is None:
                logger.warning(
                    "no weights of frozen %s in '%s'; it keeps its current weights", name, chosen.tag
                )
            else:
                leaf.load_state_dict(_weights_of(weights, chosen, name))
            if leaf.optimizer is not None:
                # select returns only sets with every required file
                leaf.optimizer.load_state_dict(payloads[(name, "optim")])
        trainer.load_state_dict(payloads[(group, "trainer")], strict=self.strict)
        trainer.resumed_from = ResumePoint(
            chosen.folder.ref, chosen.tag, trainer.update_counter.cur_iteration.copy()
        )


def _weights_of(payload: Any, chosen: CheckpointSet, name: str) -> Any:
    if not isinstance(payload, dict) or "state_dict" not in payload:
        info = chosen.file(name, "model")
        raise ValueError(
            f"{info.path if info else name} is not a ksuit weights file (no 'state_dict' key); "
            "the set cannot be resumed from"
        )
    return payload["state_dict"]
