"""`ValidationLossCallback`: the trainer's loss on a held-out dataset, as a metric."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset

from ksuit.callbacks.base import PeriodicCallback
from ksuit.utils import distributed

if TYPE_CHECKING:
    from ksuit.trainers.base import BaseTrainer

logger = logging.getLogger(__name__)


def batch_len(batch: Any) -> int:
    """Number of samples in a collated batch (the first dimension of its first tensor)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            try:
                return batch_len(item)
            except TypeError:
                continue
    raise TypeError(f"cannot tell the number of samples of a {type(batch).__name__} batch")


class ValidationLossCallback(PeriodicCallback):
    """Computes `trainer.loss` over a dataset in eval mode without gradients and logs the
    sample-weighted mean as `metric_key` (and each extra loss term as `<metric_key>/<term>`).

    `dataset` is a dataset or the name of one passed to `fit(datasets=...)` (default "val").
    Under torchrun every rank evaluates its share and the sums are reduced, so all ranks get the
    same value. Runs every epoch unless a period is given.
    """

    order = 0
    default_name = "validation_loss"
    default_every_n_epochs = 1

    def __init__(
        self,
        dataset: str | Dataset[Any] = "val",
        batch_size: int | None = None,
        metric_key: str = "loss/val",
        every_n_epochs: int | None = None,
        every_n_updates: int | None = None,
        every_n_samples: int | None = None,
        name: str | None = None,
    ):
        super().__init__(every_n_epochs, every_n_updates, every_n_samples, name=name)
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size <= 0):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.metric_key = metric_key
        self.loader: DataLoader[Any] | None = None

    def before_training(self, trainer: BaseTrainer) -> None:
        dataset = self.dataset
        if isinstance(dataset, str):
            if dataset not in trainer.datasets:
                known = ", ".join(sorted(trainer.datasets)) or "none"
                raise KeyError(
                    f"'{self.name}' evaluates dataset '{dataset}', which the run does not have (known: "
                    f"{known}); check the data section of the config"
                )
            dataset = trainer.datasets[dataset]
        n = len(dataset)  # type: ignore[arg-type]  # Dataset declares no __len__; a map-style one has it
        # every rank takes every world_size-th sample: no padding, so the mean is exact
        indices = list(range(trainer.rank, n, trainer.world_size))
        self.loader = DataLoader(
            dataset,
            batch_size=self.batch_size or trainer.batch_size,
            sampler=indices,
            num_workers=trainer.num_workers,
            generator=torch.Generator().manual_seed(0),  # never the global generator: resume stays exact
        )

    @torch.no_grad()
    def invoke(self, trainer: BaseTrainer) -> None:
        if self.loader is None:
            raise RuntimeError(f"'{self.name}' has no data loader yet: before_training(trainer) builds it")
        model = trainer.model
        was_training = model.training
        model.eval()
        sums: dict[str, float] = {}
        count = 0
        try:
            for batch in self.loader:
                n = batch_len(batch)
                with trainer.autocast():
                    out = trainer.loss(model, trainer.to_device(batch))
                total, parts = trainer.split_loss(out)
                for key, value in {"": total, **parts}.items():
                    sums[key] = sums.get(key, 0.0) + float(value.double().item()) * n
                count += n
        finally:
            model.train(was_training)
        keys = sorted(sums)
        reduced = distributed.all_reduce_sum([sums[k] for k in keys] + [float(count)], trainer.device)
        total_count = reduced[-1]
        if total_count == 0:
            raise ValueError(f"'{self.name}': the validation dataset is empty")
        for key, total_sum in zip(keys, reduced[:-1], strict=True):
            trainer.log_metric(
                self.metric_key if key == "" else f"{self.metric_key}/{key}", total_sum / total_count
            )
