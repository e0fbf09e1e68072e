"""Checkpoint callbacks: periodic/`latest`/`last` sets, and the best weights by a metric."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ksuit.callbacks.base import PeriodicCallback
from ksuit.layout import LAST, LATEST, validate_tag
from ksuit.models.selection import select_leaves
from ksuit.retention import RetentionPolicy
from ksuit.retention.estimate import kept_at_most
from ksuit.utils.units import human_bytes
from ksuit.writers import SaveSpec

if TYPE_CHECKING:
    from ksuit.models import ModelBase
    from ksuit.trainers.base import BaseTrainer

logger = logging.getLogger(__name__)

TRAINER_FILE_BYTES = 16 * 1024  # counter, callback states and RNG states: a few KiB per rank


def weights_nbytes(leaf: ModelBase) -> int:
    return sum(t.numel() * t.element_size() for t in leaf.state_dict().values())


def optimizer_nbytes(leaf: ModelBase) -> int:
    """Bytes of a leaf's optimizer state: measured once it exists, estimated before the first step
    (Adam-like optimizers keep two tensors per parameter, SGD with momentum one)."""
    optim = leaf.optimizer
    if optim is None:
        return 0
    state = optim.torch_optim.state
    if state:
        return sum(
            t.numel() * t.element_size() for s in state.values() for t in s.values() if hasattr(t, "numel")
        )
    params: int = sum(p.numel() * p.element_size() for g in optim.param_groups for p in g["params"])
    kind = type(optim.torch_optim).__name__.lower()  # also for optimizers built by the caller
    if "sgd" in kind:
        return params if optim.param_groups[0].get("momentum", 0) else 0
    return 2 * params


class CheckpointCallback(PeriodicCallback):
    """Saves the model through `CheckpointWriter.save` periodically and `last` after training.

    A periodic save uses the progress tag (`E10_U230_S14720`) for what `save_weights` and
    `save_optim` ask, and `latest` (overwritten each time) for what `save_latest_weights` and
    `save_latest_optim` ask; when only `latest` files are asked for, it saves under `latest`
    alone. A trainer file (counter, callbacks, RNG) goes with every save that writes optimizer
    state, since only such sets can be resumed. `model_names` restricts the save to submodels
    (key paths such as `encoder`, or full names). `last` is written after training, in the same
    save as the final periodic one when that falls on the last update (so identical files are
    written once). `retention` (`ksuit.retention.RetentionPolicy`, or its YAML mapping) governs
    the run's checkpoint folder (set it once: here or at the top of the run config). Before
    training it logs the most disk the run's checkpoints will take under that policy, and warns
    when that is more than the disk has free.
    """

    order = 20
    default_name = "checkpoint"

    def __init__(
        self,
        save_weights: bool = True,
        save_optim: bool = True,
        save_latest_weights: bool = False,
        save_latest_optim: bool = False,
        model_names: list[str] | None = None,
        save_last: bool = True,
        save_frozen_weights: bool = True,
        every_n_epochs: int | None = None,
        every_n_updates: int | None = None,
        every_n_samples: int | None = None,
        name: str | None = None,
        retention: RetentionPolicy | None = None,
    ):
        super().__init__(every_n_epochs, every_n_updates, every_n_samples, name=name)
        if not (save_weights or save_optim or save_latest_weights or save_latest_optim):
            raise ValueError(
                f"checkpoint callback '{self.name}' saves nothing; set save_weights, save_optim, "
                "save_latest_weights or save_latest_optim"
            )
        self.spec = SaveSpec(
            save_weights=save_weights,
            save_optim=save_optim,
            save_latest_weights=save_latest_weights,
            save_latest_optim=save_latest_optim,
            model_names_to_save=None if model_names is None else tuple(model_names),
            save_frozen_weights=save_frozen_weights,
        )
        self.save_last = save_last
        if retention is not None and not isinstance(retention, RetentionPolicy):
            retention = RetentionPolicy.model_validate(retention)
        self.retention = retention
        self.estimated_bytes: int | None = None
        self._last_at: int | None = None  # the update `last` was written at by invoke()

    @property
    def model_names(self) -> list[str] | None:
        names = self.spec.model_names_to_save
        return None if names is None else list(names)

    @property
    def resumable(self) -> bool:
        """Whether this callback's sets carry optimizer state, and so a trainer file."""
        return self.spec.resumable

    def invoke(self, trainer: BaseTrainer) -> None:
        counter = trainer.update_counter
        spec = self.spec if self.spec.writes_progress else self.spec.latest_only()
        if self.save_last and counter.is_finished:  # the end: `last` joins this save
            spec = dataclasses.replace(spec, save_last=True)
            self._last_at = counter.update
        tag = str(counter.cur_iteration) if self.spec.writes_progress else LATEST
        trainer.save_checkpoint(tag, spec, include_trainer=self.resumable)

    def after_training(self, trainer: BaseTrainer) -> None:
        if self.save_last and self._last_at != trainer.update_counter.update:
            trainer.save_checkpoint(LAST, self.spec.merged(), include_trainer=self.resumable)

    def before_training(self, trainer: BaseTrainer) -> None:
        leaves = select_leaves(trainer.model, self.model_names)  # also checks the names
        self.estimated_bytes = self.estimate_bytes(trainer, leaves)

    def estimate_bytes(self, trainer: BaseTrainer, leaves: Sequence[tuple[str, ModelBase]]) -> int:
        """The most disk the files of this callback will take during the run, under the run's
        retention policy (logged on rank 0, with a warning when the disk has less free)."""
        spec = self.spec
        if not spec.save_frozen_weights:
            leaves = [(n, leaf) for n, leaf in leaves if not leaf.is_frozen]
        weights = sum(weights_nbytes(leaf) for _, leaf in leaves)
        optim = sum(optimizer_nbytes(leaf) for _, leaf in leaves)
        trainer_file = TRAINER_FILE_BYTES * trainer.world_size if self.resumable else 0
        counter = trainer.update_counter
        updates = self.updates_between(
            counter.update, counter.end_update, trainer.updates_per_epoch, trainer.effective_batch_size
        )
        saves = len(updates)
        policy = trainer.checkpoint_writer.retention
        per_save = weights * spec.save_weights + optim * spec.save_optim
        kept = saves
        if policy is not None and per_save:
            iterations = [
                (u // trainer.updates_per_epoch, u, u * trainer.effective_batch_size) for u in updates
            ]
            kept = kept_at_most(policy, iterations)
        periodic = kept * (per_save + trainer_file) if per_save else 0
        latest = weights * spec.save_latest_weights + optim * spec.save_latest_optim
        latest = latest + trainer_file if latest and saves else 0
        last = 0
        if self.save_last:  # its optimizer and trainer files are links of latest's when both exist
            shared = (optim * spec.save_latest_optim + trainer_file) if latest else 0
            last = (
                weights * spec.merged().save_weights
                + optim * spec.merged().save_optim
                + trainer_file
                - shared
            )
        total = periodic + latest + last
        if policy is not None and policy.max_bytes is not None:
            total = min(total, policy.max_bytes)
        if trainer.rank == 0:
            each = per_save + trainer_file if per_save else 0
            self._log_estimate(trainer, leaves, saves, kept, each, latest, last, total)
        return total

    def _log_estimate(
        self,
        trainer: BaseTrainer,
        leaves: Sequence[tuple[str, ModelBase]],
        saves: int,
        kept: int,
        per_save: int,
        latest: int,
        last: int,
        total: int,
    ) -> None:
        policy = trainer.checkpoint_writer.retention
        parts = []
        if saves and per_save:
            held = f", at most {kept} kept at once" if kept < saves else ""
            parts.append(f"{saves} progress saves of {human_bytes(per_save)}{held}")
        if latest:
            parts.append(f"'latest' {human_bytes(latest)} (overwritten; twice that while it is replaced)")
        if last:
            parts.append(f"'last' {human_bytes(last)}")
        rule = f" under retention ({policy.describe()})" if policy is not None else ""
        logger.info(
            "checkpoints of '%s' (%s): %s; at most %s on disk%s",
            self.name,
            ", ".join(n for n, _ in leaves),
            "; ".join(parts) or "nothing to save",
            human_bytes(total),
            rule,
        )
        free = trainer.checkpoint_writer.free_bytes()
        if free is not None and total > free:
            logger.warning(
                "checkpoints of '%s' may take %s but the disk of %s has %s free: set a retention "
                "policy (retention: keep_last, max_bytes, ...), save less, or free disk space",
                self.name,
                human_bytes(total),
                trainer.path_provider.checkpoint_path,
                human_bytes(free),
            )


class BestCheckpointCallback(PeriodicCallback):
    """Saves the weights (only) whenever `metric_key` improves, under the tag
    `best_model.<metric key with '/' replaced by '.'>` (e.g. `best_model.loss.val`).

    The metric must be logged at the same update by a callback that runs before this one (such
    as `ValidationLossCallback`, with the same period). The best value survives resume.
    """

    order = 10
    default_name = "best_checkpoint"
    default_every_n_epochs = 1

    def __init__(
        self,
        metric_key: str,
        higher_is_better: bool = False,
        model_names: list[str] | None = None,
        every_n_epochs: int | None = None,
        every_n_updates: int | None = None,
        every_n_samples: int | None = None,
        name: str | None = None,
    ):
        super().__init__(every_n_epochs, every_n_updates, every_n_samples, name=name)
        if not isinstance(metric_key, str) or not metric_key:
            raise ValueError(f"metric_key must be a non-empty str such as 'loss/val', got {metric_key!r}")
        self.metric_key = metric_key
        self.higher_is_better = bool(higher_is_better)
        self.model_names = None if model_names is None else list(model_names)
        self.tag = validate_tag("best_model." + metric_key.replace("/", "."))
        self.best_value: float | None = None
        self.best_iteration: dict[str, int] | None = None

    def before_training(self, trainer: BaseTrainer) -> None:
        select_leaves(trainer.model, self.model_names)  # checks the names early

    def is_better(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best_value is None:
            return True
        return value > self.best_value if self.higher_is_better else value < self.best_value

    def invoke(self, trainer: BaseTrainer) -> None:
        if self.metric_key not in trainer.metrics:
            known = ", ".join(sorted(trainer.metrics)) or "none yet"
            raise KeyError(
                f"'{self.name}' watches metric '{self.metric_key}', which no callback logged "
                f"(known: {known}); "
                "add a callback that logs it (e.g. validation_loss) before this one, with the same period"
            )
        counter = trainer.update_counter
        if trainer.metric_updates.get(self.metric_key) != counter.update:
            logger.warning(
                "'%s': metric '%s' was not computed at %s (last at update %s); not compared",
                self.name,
                self.metric_key,
                counter.cur_iteration,
                trainer.metric_updates.get(self.metric_key),
            )
            return
        value = trainer.metrics[self.metric_key]
        if not self.is_better(value):
            return
        previous = self.best_value
        self.best_value = value
        self.best_iteration = dict(counter.cur_iteration)
        names = None if self.model_names is None else tuple(self.model_names)
        spec = SaveSpec(save_weights=True, save_optim=False, model_names_to_save=names)
        trainer.save_checkpoint(self.tag, spec, include_trainer=False)
        if trainer.rank == 0:
            logger.debug(
                "new best %s %.6g (was %s) at %s: saved '%s'",
                self.metric_key,
                value,
                "none" if previous is None else f"{previous:.6g}",
                counter.cur_iteration,
                self.tag,
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            "metric_key": self.metric_key,
            "best_value": self.best_value,
            "best_iteration": self.best_iteration,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("metric_key", self.metric_key) != self.metric_key:
            raise ValueError(
                f"'{self.name}' watches '{self.metric_key}' but its saved state is for "
                f"'{state_dict['metric_key']}'"
            )
        value = state_dict.get("best_value")
        self.best_value = None if value is None else float(value)
        self.best_iteration = state_dict.get("best_iteration")
