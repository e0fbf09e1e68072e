"""Exponential moving averages of model weights, saved as their own checkpoint files.

For every selected leaf and factor `f`, after every update: `ema = f * ema + (1 - f) * weights`
(floating tensors; other buffers are copied). Files are `<name>_ema=<f>_cp=<tag>_model.<ext>`,
in the format of the run's other weights files (`.th`, or `.safetensors` with
`checkpoint_format: safetensors`), each group `<name>_ema=<f>` with its own manifest, written
through `CheckpointWriter`. A resume reads either format.
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any

import torch

from ksuit.callbacks.base import PeriodicCallback
from ksuit.layout import LAST, LATEST, SHARDED_FORMAT, CheckpointName, checkpoint_filename, format_info
from ksuit.models.selection import select_leaves
from ksuit.models.sharding import is_sharded
from ksuit.readers import scan_sets
from ksuit.readers.leaf_loading import load_state_like

if TYPE_CHECKING:
    from ksuit.models import Model
    from ksuit.readers import CheckpointSet, ResumePoint
    from ksuit.trainers.base import BaseTrainer

logger = logging.getLogger(__name__)


class EmaCallback(PeriodicCallback):
    """EMA of the weights of `model_names` (submodel key paths or full leaf names; default: all
    leaves) for each of `target_factors`.

    Saves the EMA weights under the progress tag when due (`save_weights`, every_n_*), under
    `latest` whenever a resumable `latest` checkpoint is written (`save_latest_weights`), and
    under `last` after training (`save_last_weights`). A resumed run reloads the EMA files
    written at the iteration it resumes from, so the averages continue exactly.

    `model_paths` is the old name of `model_names`, accepted with a DeprecationWarning.
    """

    order = 10
    default_name = "ema"

    def __init__(
        self,
        target_factors: list[float],
        model_names: list[str] | None = None,
        save_weights: bool = True,
        save_latest_weights: bool = True,
        save_last_weights: bool = True,
        every_n_epochs: int | None = None,
        every_n_updates: int | None = None,
        every_n_samples: int | None = None,
        name: str | None = None,
        *,
        model_paths: list[str] | None = None,
    ):
        super().__init__(every_n_epochs, every_n_updates, every_n_samples, name=name)
        if model_paths is not None:
            if model_names is not None:
                raise ValueError(
                    f"EMA '{self.name}' got both model_names and model_paths; "
                    "keep model_names (model_paths is its old name)"
                )
            warnings.warn(
                "EmaCallback's 'model_paths' is deprecated; name the key 'model_names' (same values)",
                DeprecationWarning,
                stacklevel=2,
            )
            model_names = model_paths
        if isinstance(target_factors, (int, float)):
            target_factors = [target_factors]
        factors = [float(f) for f in target_factors]
        if not factors or any(not 0.0 < f < 1.0 for f in factors):
            raise ValueError(
                f"target_factors must be numbers strictly between 0 and 1, got {target_factors!r}"
            )
        if len(set(factors)) != len(factors):
            raise ValueError(f"target_factors has duplicates: {target_factors!r}")
        self.target_factors = factors
        self.model_names = None if model_names is None else list(model_names)
        self.save_weights = save_weights
        self.save_latest_weights = save_latest_weights
        self.save_last_weights = save_last_weights
        self.leaves: list[tuple[str, Model]] = []
        self.ema: dict[tuple[str, float], dict[str, torch.Tensor]] = {}
        self._pairs: dict[
            float, tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]
        ] = {}
        self._saved: set[tuple[str, int]] = set()

    # ---- averaging --------------------------------------------------------------------------------
    def before_training(self, trainer: BaseTrainer) -> None:
        self.leaves = select_leaves(trainer.model, self.model_names)
        self.ema = {
            (name, f): {k: v.detach().clone() for k, v in leaf.state_dict().items()}
            for name, leaf in self.leaves
            for f in self.target_factors
        }
        if trainer.resumed_from is not None:
            self._load(trainer.resumed_from)
        # the live tensors of state_dict() share storage with the parameters and buffers, which
        # optimizers and forward passes change in place: pair them once
        self._pairs = {}
        for f in self.target_factors:
            float_ema, float_live, other_ema, other_live = [], [], [], []
            for name, leaf in self.leaves:
                ema = self.ema[(name, f)]
                for k, live in leaf.state_dict().items():
                    if live.is_floating_point():
                        float_ema.append(ema[k])
                        float_live.append(live)
                    else:
                        other_ema.append(ema[k])
                        other_live.append(live)
            self._pairs[f] = (float_ema, float_live, other_ema, other_live)

    @torch.no_grad()
    def after_update(self, trainer: BaseTrainer) -> None:
        for f, (float_ema, float_live, other_ema, other_live) in self._pairs.items():
            if float_ema:
                torch._foreach_lerp_(float_ema, float_live, 1.0 - f)
            for e, live in zip(other_ema, other_live, strict=True):
                e.copy_(live)
        super().after_update(trainer)

    # ---- saving -------------------------------------------------------------------------------------
    def invoke(self, trainer: BaseTrainer) -> None:
        if self.save_weights:
            self._save(trainer, str(trainer.update_counter.cur_iteration))

    def on_resumable_save(self, trainer: BaseTrainer, tags: list[str]) -> None:
        for tag in tags:
            wanted = {LATEST: self.save_latest_weights, LAST: self.save_last_weights}.get(
                tag, self.save_weights
            )
            if wanted:
                self._save(trainer, tag)

    def after_training(self, trainer: BaseTrainer) -> None:
        if self.save_last_weights:
            self._save(trainer, LAST)

    def filename(self, name: str, factor: float, tag: str, fmt: str = "torch") -> str:
        """`<name>_ema=<factor>_cp=<tag>_model.<ext>`, the extension of format `fmt`."""
        return checkpoint_filename(name, tag, "model", info=format_info({"ema": factor}), fmt=fmt)

    def _save(self, trainer: BaseTrainer, tag: str) -> None:
        key = (tag, trainer.update_counter.update)
        if key in self._saved:  # e.g. its own periodic save and a checkpoint at the same update
            return
        self._saved.add(key)
        writer = trainer.checkpoint_writer
        for name, leaf in self.leaves:
            # a sharded leaf's averages are DTensors too: every rank writes its shards
            fmt = SHARDED_FORMAT if is_sharded(leaf) else writer.format
            for f in self.target_factors:
                writer.save_model_checkpoint(
                    self.filename(name, f, tag, fmt=fmt),
                    self.ema[(name, f)],
                    tag,
                    model_config=leaf.model_config,
                    ema_factor=f,
                )

    # ---- resume ---------------------------------------------------------------------------------------
    def _load(self, point: ResumePoint) -> None:
        sets = scan_sets(point.checkpoint_dir)
        for name, _leaf in self.leaves:
            for f in self.target_factors:
                group = CheckpointName(name, LATEST, "model", format_info({"ema": f})).group
                chosen, exact = self._choose(point, [s for s in sets if s.group == group])
                if chosen is None:
                    logger.warning(
                        "no EMA file of %s (factor %s) to resume from; the average restarts from the "
                        "current weights and will differ from an uninterrupted run",
                        name,
                        f,
                    )
                    continue
                if not exact:
                    logger.warning(
                        "the EMA of %s (factor %s) resumes from '%s' at %s while training resumes at %s: "
                        "the average will differ from an uninterrupted run",
                        name,
                        f,
                        chosen.tag,
                        chosen.training_iteration,
                        point.training_iteration,
                    )
                # `.th`, `.safetensors` or a sharded folder: the format of the run that wrote it
                info = next(i for i in chosen.files.values() if i.role == "model")
                target = self.ema[(name, f)]
                state = load_state_like(target, info.path)
                if set(state) != set(target):
                    raise ValueError(
                        f"EMA file {info.path} does not fit {name}: "
                        f"missing {sorted(set(target) - set(state))}, "
                        f"unexpected {sorted(set(state) - set(target))}"
                    )
                for k, t in target.items():
                    t.copy_(state[k])
                logger.info("resumed the EMA of %s (factor %s) from %s", name, f, info.name)

    @staticmethod
    def _choose(point: ResumePoint, sets: list[CheckpointSet]) -> tuple[CheckpointSet | None, bool]:
        """The set written at the resume iteration (same tag first, then `latest`), else the newest."""
        for s in sets:
            if s.ok:
                s.check(checksum=True)
        usable = [s for s in sets if s.ok]
        at_point = [s for s in usable if s.training_iteration == point.training_iteration]
        if at_point:
            at_point.sort(key=lambda s: (s.tag != point.tag, s.tag != LATEST))
            return at_point[0], True
        dated: list[tuple[int, CheckpointSet]] = []
        for s in usable:
            it = s.training_iteration
            if it is not None and it.is_fully_specified and it.update is not None:
                dated.append((it.update, s))
        if not dated:
            return None, False
        return max(dated, key=lambda d: d[0])[1], False

    # ---- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"target_factors": list(self.target_factors), "model_names": self.model_names}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = [float(f) for f in state_dict.get("target_factors", self.target_factors)]
        if saved != self.target_factors:
            logger.warning(
                "EMA '%s' was saved with factors %s and now has %s; factors without files restart",
                self.name,
                saved,
                self.target_factors,
            )
