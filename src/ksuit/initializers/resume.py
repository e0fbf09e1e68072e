"""`ResumeInitializer`: continue a run from one of its checkpoint sets, exactly."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from ksuit.initializers.base import Initializer, describe_spec, parse_checkpoint_spec
from ksuit.readers import (
    CheckpointSet,
    LoadedSet,
    ResumePoint,
    find_checkpoint_dir,
    load_resume_set,
    select_resume_set,
)
from ksuit.readers.listing import checkpoint_folder
from ksuit.readers.resume_set import restore_leaves, resume_files
from ksuit.readers.sets import choose_set
from ksuit.storage import Backend
from ksuit.storage.locations import is_url
from ksuit.utils.training import TrainingIteration

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
        mirror: the run folder of a replicated copy (`trainer.checkpoint_mirror`, e.g.
            `s3://bucket/runs/<run_id>`): the newest usable set of either copy is taken (the
            local one on a tie), so a machine without the local folder resumes from the mirror.
    """

    def __init__(
        self,
        run_dir: str | Path,
        checkpoint: Any = None,
        strict: bool = True,
        mirror: str | Path | None = None,
    ):
        self.run_dir = run_dir if is_url(run_dir) else Path(run_dir)
        self.mirror = None if mirror is None else (mirror if is_url(mirror) else Path(mirror))
        self.checkpoint = parse_checkpoint_spec(checkpoint)
        self.strict = strict
        self.chosen: CheckpointSet | None = None
        self.skipped: list[tuple[str, str]] = []

    def required_files(self, trainer: BaseTrainer) -> list[tuple[str, str]]:
        return resume_files(trainer.model)[0]

    def _copies(self) -> list[str | Path]:
        """Where the run's sets are: the run folder, then the mirror if there is one."""
        return [self.run_dir] + ([self.mirror] if self.mirror is not None else [])

    def select(self, trainer: BaseTrainer) -> CheckpointSet:
        """The set a resume would start from (every file checked against its manifest), without
        loading it: the newest usable set of the run folder or of the mirror (the local one on a
        tie); `apply` chooses the same set."""
        found: list[tuple[CheckpointSet, list[tuple[str, str]]]] = []
        errors: list[OSError] = []
        for where in self._copies():
            try:
                folder = find_checkpoint_dir(where)
                found.append(
                    select_resume_set(
                        folder, trainer.model.name, self.checkpoint, self.required_files(trainer)
                    )
                )
            except (FileNotFoundError, NotADirectoryError) as e:
                errors.append(e)
        if not found:
            _raise_none_found(errors)
        # the newest of the copies; on a tie the first (local) one
        chosen, skipped = max(found, key=lambda f: _iteration_key(f[0].training_iteration))
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

    def _load(self, trainer: BaseTrainer) -> LoadedSet:
        """The chosen set with its files loaded in one pass (`ksuit.readers.load_resume_set`:
        each file read once, checked against its manifest from the bytes loaded).

        With a mirror, the copies are ordered by the newest set their manifests promise (read
        without reading a data file; the local copy first on a tie) and loaded in that order,
        each in one pass, until none left could hold a newer set than the one loaded: the copy
        that loses is never read (nor downloaded), and where the newest set of a copy fails its
        checksums, a copy that promised a newer set than the one it fell back to is tried too.
        The set chosen is the one `select` chooses."""
        group = trainer.model.name
        required, wanted = resume_files(trainer.model)
        errors: list[OSError] = []
        promised: list[tuple[tuple[int, int, int], int, Backend]] = []
        for index, where in enumerate(self._copies()):
            try:
                folder = checkpoint_folder(find_checkpoint_dir(where))
                if self.mirror is None:  # one copy: nothing to order
                    promised.append(((0, 0, 0), 0, folder))
                    continue
                with folder.lock():
                    newest, _ = choose_set(folder, group, self.checkpoint, required, _by_manifest)
                promised.append((_iteration_key(newest.training_iteration), -index, folder))
            except (FileNotFoundError, NotADirectoryError) as e:
                errors.append(e)
        best: LoadedSet | None = None
        for key, _, folder in sorted(promised, key=lambda p: p[:2], reverse=True):
            if best is not None and _iteration_key(best.chosen.training_iteration) >= key:
                break  # no set of this copy can be newer than the one loaded
            try:
                loaded = load_resume_set(folder, group, self.checkpoint, required, wanted)
            except FileNotFoundError as e:
                errors.append(e)
                continue
            if best is None or _iteration_key(loaded.chosen.training_iteration) > _iteration_key(
                best.chosen.training_iteration
            ):
                best = loaded  # on a tie the copy loaded first (local) stays
        if best is None:
            _raise_none_found(errors)
        self._chose(trainer, best.chosen, best.skipped)
        return best

    def apply(self, trainer: BaseTrainer) -> None:
        """Chooses the set, loads it, and restores the model, the optimizers and the trainer
        from it. A sharded checkpoint folder is loaded resharded for this run's ranks."""
        loaded = self._load(trainer)
        chosen, payloads = loaded.chosen, loaded.payloads
        for name in restore_leaves(trainer.model, loaded):
            logger.warning("no weights of frozen %s in '%s'; it keeps its current weights", name, chosen.tag)
        trainer.load_state_dict(payloads[(trainer.model.name, "trainer")], strict=self.strict)
        trainer.resumed_from = ResumePoint(
            chosen.folder.ref, chosen.tag, trainer.update_counter.cur_iteration.copy()
        )


def _raise_none_found(errors: list[OSError]) -> NoReturn:
    """Raises why no copy had a usable set: the one error, or all of them in one."""
    if len(errors) > 1:
        raise FileNotFoundError("; ".join(str(e) for e in errors)) from errors[0]
    raise errors[0]


def _by_manifest(s: CheckpointSet) -> str | None:
    """Takes a set on its manifest alone: where the ordering of copies needs no data read."""
    return None


def _iteration_key(it: TrainingIteration | None) -> tuple[int, int, int]:
    if it is None or not it.is_fully_specified:
        return (-1, -1, -1)
    return (it.update or 0, it.epoch or 0, it.sample or 0)
