"""The trainer file: everything beyond weights and optimizer states that a resume restores.

`{callback_state_dicts, training_iteration, grad_scaler (float16 only), rng, data, metrics,
train_loss, elastic}`, plain values and tensors only (it loads with `weights_only=True`). With
`rng.py` this module is the whole resume contract: a resumed run continues exactly like an
uninterrupted one, or loading refuses with the reason (another data layout or set of callbacks).

A run may resume on another number of processes (elastic): the data order does not depend on
the world size (`ksuit.trainers.sampler`) and the global batch stays the same; every rank's RNG
is then re-derived from (seed, update, rank) (`rng.restore_own_rank`), and each such change is
recorded in `elastic`, which later trainer files carry on.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ksuit.trainers import rng

if TYPE_CHECKING:
    from ksuit.callbacks.base import Callback
    from ksuit.trainers.base import BaseTrainer

logger = logging.getLogger(__name__)

# the settings that fix the data order; a resume with other values could not continue it
DATA_KEYS = ("updates_per_epoch", "effective_batch_size", "accumulation_steps", "seed")


def saved_callbacks(trainer: BaseTrainer) -> list[Callback]:
    """The callbacks whose state the trainer file holds (not the presentation ones, e.g. the
    progress bar, so a run resumes the same with or without them)."""
    return [cb for cb in trainer.callbacks if cb.saves_state]


def trainer_state_dict(trainer: BaseTrainer) -> dict[str, Any]:
    """The trainer file's content. Gathers the RNG states of every rank: a collective."""
    state: dict[str, Any] = {
        "callback_state_dicts": {cb.name: cb.state_dict() for cb in saved_callbacks(trainer)},
        "training_iteration": dict(trainer.update_counter.cur_iteration),
    }
    if trainer.grad_scaler is not None:
        state["grad_scaler"] = trainer.grad_scaler.state_dict()
    state["rng"] = rng.capture_all_ranks()
    state["data"] = {
        "seed": trainer.seed,
        "world_size": trainer.world_size,
        "effective_batch_size": trainer.effective_batch_size,
        "accumulation_steps": trainer.accumulation_steps,
        "updates_per_epoch": trainer.updates_per_epoch,
    }
    state.update(trainer.metric_tracker.state_dict())  # metrics, train_loss
    state["elastic"] = [dict(event) for event in trainer.elastic_events]
    return state


def load_trainer_state_dict(trainer: BaseTrainer, state_dict: dict[str, Any], strict: bool = True) -> None:
    """Restores `trainer_state_dict()`'s output into a set-up trainer (see
    `BaseTrainer.load_state_dict`); returns after restoring this rank's RNG."""
    if not trainer.is_set_up:
        raise RuntimeError("load_state_dict needs a set-up trainer; pass the initializer to fit() instead")
    missing_keys = [k for k in ("callback_state_dicts", "training_iteration", "rng") if k not in state_dict]
    if missing_keys:
        raise ValueError(f"trainer state lacks {', '.join(missing_keys)}; is it a ksuit trainer file?")
    check_data(trainer, state_dict.get("data", {}))
    _load_callbacks(saved_callbacks(trainer), state_dict["callback_state_dicts"], strict)
    counter = trainer.update_counter
    counter.load_state_dict(state_dict["training_iteration"])
    it = counter.cur_iteration
    if not it.is_fully_specified or counter.epoch != counter.update // trainer.updates_per_epoch:
        raise ValueError(
            f"checkpoint iteration {it} does not fit {trainer.updates_per_epoch} updates per epoch; "
            "resume with the data and batch size of the run that wrote it"
        )
    _load_grad_scaler(trainer, state_dict.get("grad_scaler"))
    trainer.metric_tracker.load_state_dict(state_dict)
    trainer.elastic_events = [dict(e) for e in state_dict.get("elastic", []) if isinstance(e, dict)]
    event = restore_rng(trainer, state_dict["rng"])
    if event is not None:
        trainer.elastic_events.append(event)
        if trainer.rank == 0:
            logger.warning(
                "resuming a run of %d processes on %d: model and optimizer state are resharded, the data "
                "order continues where it stopped, and each rank's random generators are re-derived from "
                "(seed %d, update %d, rank) (recorded in the trainer state as 'elastic')",
                event["from_world_size"],
                event["world_size"],
                event["seed"],
                event["update"],
            )


def restore_rng(trainer: BaseTrainer, all_ranks: dict[str, Any]) -> dict[str, Any] | None:
    """This rank's saved generators, or (another world size) generators re-derived from
    (seed, update, rank); returns the elastic event, None when restored as saved."""
    return rng.restore_own_rank(all_ranks, trainer.seed, trainer.update_counter.update)


def check_data(trainer: BaseTrainer, data: dict[str, Any]) -> None:
    """Refuses a checkpoint whose data order this trainer could not continue."""
    for key in DATA_KEYS:
        now = getattr(trainer, key)
        if key in data and int(data[key]) != now:
            raise ValueError(
                f"the checkpoint was written with {key}={data[key]} but this run has {key}={now}; "
                "the data order could not continue where it stopped. Resume with the same config, "
                "or start a new run from its weights (PreviousRunInitializer)"
            )


def _load_callbacks(callbacks: list[Callback], saved: dict[str, Any], strict: bool) -> None:
    names = [cb.name for cb in callbacks]
    missing = [n for n in names if n not in saved]
    unexpected = [n for n in saved if n not in names]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"callbacks without saved state: {', '.join(missing)}")
        if unexpected:
            parts.append(f"saved state of unknown callbacks: {', '.join(unexpected)}")
        raise ValueError(
            "callback states do not match the callbacks of this run (" + "; ".join(parts) + "); "
            "resume with the callbacks (and names) of the run that wrote the checkpoint"
        )
    for cb in callbacks:
        if cb.name in saved:
            cb.load_state_dict(saved[cb.name])


def _load_grad_scaler(trainer: BaseTrainer, state: dict[str, Any] | None) -> None:
    if trainer.grad_scaler is not None:
        if state is not None:
            trainer.grad_scaler.load_state_dict(state)
        else:
            logger.warning(
                "the checkpoint has no grad scaler state (it was not trained in float16); "
                "the scaler starts fresh"
            )
    elif state is not None:
        logger.warning("the checkpoint has a grad scaler state but this run does not use float16; ignored")
