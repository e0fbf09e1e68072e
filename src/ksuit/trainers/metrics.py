"""`MetricTracker`: the metrics a run logged, the update of each, and the running train loss."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from ksuit.utils import distributed

logger = logging.getLogger(__name__)


class MetricTracker:
    """Metrics by key (`values`, e.g. `loss/val`) with the update each was last logged at
    (`updates`), plus the sums of the train losses since the last epoch end.

    `state_dict()` holds all of it, so a resumed run logs the same epoch loss (and a
    `BestCheckpointCallback` compares against the same best value) as an uninterrupted one.
    """

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.updates: dict[str, int] = {}
        self.loss_sums: dict[str, float] = {}
        self.loss_updates = 0

    def log(self, key: str, value: float, update: int) -> None:
        """Records `value` as metric `key` of update `update`."""
        self.values[key] = float(value)
        self.updates[key] = update

    def fresh(self, update: int) -> dict[str, float]:
        """The metrics logged at `update`."""
        return {k: v for k, v in self.values.items() if self.updates.get(k) == update}

    def log_fresh(self, update: int, where: object) -> None:
        """Logs the metrics logged at `update` as one line: `<where>  loss/train 0.12  ...`."""
        fresh = self.fresh(update)
        if fresh:
            logger.info("%s  %s", where, "  ".join(f"{k} {v:.6g}" for k, v in sorted(fresh.items())))

    def add_losses(self, losses: Mapping[str, torch.Tensor]) -> None:
        """Adds the losses of one update (`{"total": ..., <part>: ...}`) to the running sums."""
        for key, value in losses.items():
            self.loss_sums[key] = self.loss_sums.get(key, 0.0) + float(value.item())
        self.loss_updates += 1

    def log_mean_losses(self, update: int, device: torch.device) -> None:
        """Logs the mean of the summed losses over all ranks as `loss/train` (and
        `loss/train/<part>`), then starts new sums. A collective: every rank must call it."""
        keys = sorted(self.loss_sums)
        sums = distributed.all_reduce_sum([self.loss_sums[k] for k in keys] + [self.loss_updates], device)
        for key, total in zip(keys, sums[:-1], strict=True):
            self.log("loss/train" if key == "total" else f"loss/train/{key}", total / sums[-1], update)
        self.loss_sums, self.loss_updates = {}, 0

    def state_dict(self) -> dict[str, Any]:
        """`{"metrics": {key: {"value", "update"}}, "train_loss": {"ranks": [{"sums", "updates"}
        of rank 0, of rank 1, ...]}}`. Each rank sums its own losses, so every rank's sums are
        kept (a collective: every rank calls it, as it does `trainer.state_dict()`)."""
        own = {"sums": dict(self.loss_sums), "updates": self.loss_updates}
        return {
            "metrics": {k: {"value": v, "update": self.updates.get(k, -1)} for k, v in self.values.items()},
            "train_loss": {"ranks": distributed.all_gather_object(own)},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restores `state_dict()`'s output; missing entries (older files) start empty. Each rank
        takes its own loss sums when the world size is the one that saved them; otherwise (and
        for files with one rank's sums) rank 0 takes them all, folded, and the others start at
        zero: the next logged `loss/train` is then the same mean up to float rounding."""
        metrics = state_dict.get("metrics", {})
        self.values = {k: float(v["value"]) for k, v in metrics.items()}
        self.updates = {k: int(v["update"]) for k, v in metrics.items()}
        ranks = _rank_losses(state_dict.get("train_loss", {}))
        rank, world = distributed.rank(), distributed.world_size()
        if len(ranks) == world:
            mine = [ranks[rank]]
        else:
            mine = ranks if rank == 0 else []
        self.loss_sums, self.loss_updates = {}, 0
        for entry in mine:
            for k, v in entry.sums.items():
                self.loss_sums[k] = self.loss_sums.get(k, 0.0) + v
            self.loss_updates += entry.updates


class _RankLoss(BaseModel):
    """One rank's train-loss sums as the trainer file keeps them."""

    model_config = ConfigDict(extra="forbid", strict=True)
    sums: dict[str, float]
    updates: int = Field(ge=0)


_RANK_LOSSES = TypeAdapter(list[_RankLoss])


def _rank_losses(loss: Any) -> list[_RankLoss]:
    """The per-rank loss sums of a trainer file's `train_loss`: `{"ranks": [...]}`, or one rank's
    `{"sums", "updates"}` (files written before every rank's sums were kept), or nothing."""
    if not loss:
        return []
    try:
        if not isinstance(loss, dict):
            raise ValueError(f"a {type(loss).__name__}")
        return _RANK_LOSSES.validate_python(loss["ranks"] if "ranks" in loss else [loss])
    except (ValueError, KeyError) as e:
        raise ValueError(
            "the trainer state's train_loss is not {'ranks': [{'sums': {name: float}, 'updates': int}, "
            f"...]}} ({str(e).splitlines()[0][:200]}); the trainer file was not written by ksuit's "
            "trainer or is damaged: resume from another checkpoint"
        ) from None
