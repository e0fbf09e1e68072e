"""Exact resume for a plain PyTorch loop (no ksuit trainer): `LoopState` and `resume`.

A plain loop saves through the seed API. Wrap the module and the optimizer you built
(`ksuit.models.wrap`), and pass one `LoopState` both as the writer's update counter and as the
`trainer` whose state goes with each resumable set:

    model = ksuit.models.wrap(net, "net", optimizer=opt)
    loop = ksuit.LoopState(scheduler=sched)            # any object with state_dict/load_state_dict
    writer = ksuit.CheckpointWriter(ksuit.PathProvider(out, "run1"), loop)
    ksuit.resume(f"{out}/run1", model, loop)            # the newest complete set, if there is one
    while loop.step < 1000:
        ...                                             # one optimizer step
        loop.step += 1
        if loop.step % 100 == 0:
            writer.save(model, "latest", trainer=loop)  # weights, optimizer, loop state: one atomic set

The loop state file holds the counters (`step`, `epoch`, `sample`), the generators of python,
numpy and torch (CUDA too) of every rank, and the `state_dict()` of each object given to
`LoopState`. A resumed loop continues bit for bit where the set was saved when its randomness
comes from those generators and its data order from the counters (e.g. a sampler seeded with
the epoch, skipping the batches of the epoch already done).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Protocol

from ksuit.initializers.base import describe_spec, parse_checkpoint_spec
from ksuit.models.base import ModelBase, require_ksuit_model
from ksuit.readers import ResumePoint, load_resume_set
from ksuit.readers.listing import checkpoint_folder
from ksuit.readers.resume_set import restore_leaves, resume_files
from ksuit.readers.sets import NoCheckpointsError
from ksuit.storage import Backend, Location
from ksuit.trainers import rng
from ksuit.utils.training import TrainingIteration

logger = logging.getLogger(__name__)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any], /) -> Any: ...


class LoopState:
    """Where a plain loop stands and what it needs besides weights and optimizer states to
    continue exactly: `step` (optimizer steps), `epoch`, `sample`, the random generators, and
    the objects given by name (an LR scheduler, a grad scaler, a sampler, ...).

    It is the writer's update counter (`cur_iteration`, recorded in every file and manifest)
    and the `trainer` of `CheckpointWriter.save`; advance the counters yourself.
    """

    def __init__(self, step: int = 0, epoch: int = 0, sample: int = 0, **stateful: Stateful):
        for name, obj in stateful.items():
            if not (
                callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))
            ):
                raise TypeError(
                    f"LoopState({name}=...) takes objects with state_dict() and load_state_dict(), "
                    f"got {type(obj).__name__}"
                )
        self.step = step
        self.epoch = epoch
        self.sample = sample
        self.stateful = dict(stateful)

    @property
    def cur_iteration(self) -> TrainingIteration:
        """`E<epoch>_U<step>_S<sample>`: the iteration the writer records (and progress tags name)."""
        return TrainingIteration(epoch=self.epoch, update=self.step, sample=self.sample)

    def state_dict(self) -> dict[str, Any]:
        """Counters, every rank's RNG states (a collective under torch.distributed) and the named
        objects' state dicts: plain values and tensors, so the file loads with weights_only=True."""
        return {
            "training_iteration": dict(self.cur_iteration),
            "loop": {"step": self.step, "epoch": self.epoch, "sample": self.sample},
            "rng": rng.capture_all_ranks(),
            "stateful": {name: obj.state_dict() for name, obj in self.stateful.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Restores `state_dict()`'s output; refuses another world size, and (with `strict`)
        named objects that do not match the saved ones."""
        missing = [k for k in ("loop", "rng", "stateful") if k not in state_dict]
        if missing:
            raise ValueError(f"loop state lacks {', '.join(missing)}; was it written by ksuit.LoopState?")
        saved = state_dict["stateful"]
        unknown, absent = sorted(set(saved) - set(self.stateful)), sorted(set(self.stateful) - set(saved))
        if strict and (unknown or absent):
            raise ValueError(
                f"the checkpoint holds the state of {sorted(saved) or 'no objects'} but this LoopState has "
                f"{sorted(self.stateful) or 'none'}; pass the same objects by the same names "
                "(or strict=False to skip the difference)"
            )
        rng.check_world_size(int(state_dict["rng"]["world_size"]))
        for name, obj in self.stateful.items():
            if name in saved:
                obj.load_state_dict(saved[name])
        loop = state_dict["loop"]
        self.step, self.epoch, self.sample = int(loop["step"]), int(loop["epoch"]), int(loop["sample"])
        rng.restore_own_rank(state_dict["rng"])


def resume(
    run_dir: Location | Backend,
    model: ModelBase,
    loop: LoopState,
    checkpoint: Any = None,
    strict: bool = True,
) -> ResumePoint | None:
    """Loads the newest complete checkpoint set of `model` in `run_dir` (weights, optimizer
    states, loop state) and returns where it continues from; None on a fresh run (no folder, or
    no checkpoint of `model` yet), in which case nothing changes.

    `checkpoint` picks a set instead: a tag (`latest`, `E3_U300_S9600`) or a spec (`epoch=3`).
    Sets that are incomplete, damaged or lack a file the model needs are skipped and logged;
    when every set of the model is unusable this raises (a fresh start would overwrite them).
    """
    require_ksuit_model(model)
    if not isinstance(loop, LoopState):
        raise TypeError(f"loop must be a ksuit.LoopState, got {type(loop).__name__}")
    spec = parse_checkpoint_spec(checkpoint)
    try:
        folder = checkpoint_folder(
            run_dir if isinstance(run_dir, (Backend, str, Path)) else os.fspath(run_dir)
        )
    except FileNotFoundError:
        return None
    required, load = resume_files(model)
    try:  # recovery first completes an interrupted first save, then the folder is scanned once
        loaded = load_resume_set(folder, model.name, spec, required, load)
    except NoCheckpointsError:  # no set of the model at all: a fresh run
        return None
    chosen = loaded.chosen
    for tag, reason in loaded.skipped:
        logger.warning("skipped checkpoint '%s': %s", tag, reason)
    restore_leaves(model, loaded)
    loop.load_state_dict(loaded.payloads[(model.name, "trainer")], strict=strict)
    point = ResumePoint(chosen.folder.ref, chosen.tag, loop.cur_iteration)
    logger.info(
        "resumed from checkpoint '%s' (%s) in %s, asked for %s",
        chosen.tag,
        point.training_iteration,
        folder.location,
        describe_spec(spec),
    )
    return point


__all__ = ["LoopState", "resume"]
