"""`TrainLoader`: the training DataLoader, whose batches follow from (seed, epoch, position) only."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ksuit.trainers.sampler import ResumableBatchSampler

logger = logging.getLogger(__name__)


def batch_error(effective_batch_size: int, world_size: int, accumulation_steps: int) -> str:
    """Why `world_size` processes cannot draw the global batch, and the process counts that can."""
    message = (
        f"effective_batch_size {effective_batch_size} is not divisible by world size {world_size} x "
        f"accumulation_steps {accumulation_steps}. The global batch stays the same when a run resumes "
        "on another number of processes (so its data order continues): "
    )
    if effective_batch_size % accumulation_steps:
        return message + "choose accumulation_steps that divides effective_batch_size"
    per_step = effective_batch_size // accumulation_steps
    fits = [n for n in range(1, per_step + 1) if per_step % n == 0]
    return (
        message + f"run on a number of processes that divides {per_step} ({', '.join(map(str, fits[:12]))}"
        f"{', ...' if len(fits) > 12 else ''}), or change accumulation_steps so that processes x "
        f"accumulation_steps divides {effective_batch_size}"
    )


class TrainLoader:
    """Batches of one rank for the training loop, resumable at any update.

    `data` is a map-style dataset or a DataLoader (its dataset and collate_fn are used;
    ksuit's `ResumableBatchSampler` draws the batches). Each forward pass of each process gets
    `batch_size = effective_batch_size / (world_size * accumulation_steps)` samples. The last
    partial update of an epoch is dropped, so every epoch has exactly `updates_per_epoch` updates.
    """

    def __init__(
        self,
        data: Dataset[Any] | DataLoader[Any],
        *,
        effective_batch_size: int,
        accumulation_steps: int,
        seed: int,
        world_size: int,
        rank: int,
        num_workers: int,
        pin_memory: bool,
    ):
        per_step = world_size * accumulation_steps
        if effective_batch_size % per_step:
            raise ValueError(batch_error(effective_batch_size, world_size, accumulation_steps))
        self.batch_size = effective_batch_size // per_step
        collate_fn = None
        dataset: Dataset[Any]
        if isinstance(data, DataLoader):
            dataset, collate_fn = data.dataset, data.collate_fn
            logger.info(
                "using the DataLoader's dataset and collate_fn; ksuit's resumable sampler draws the batches"
            )
        else:
            dataset = data
        self.dataset = dataset
        try:
            n = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError("the training data must be a map-style Dataset with a length") from None
        self.seed = seed
        self.accumulation_steps = accumulation_steps
        self.sampler = ResumableBatchSampler(
            n, self.batch_size, seed=seed, shuffle=True, num_replicas=world_size, rank=rank
        )
        self.updates_per_epoch = len(self.sampler) // accumulation_steps
        if self.updates_per_epoch == 0:
            raise ValueError(
                f"the training data has {n} samples, fewer than one update needs "
                f"(effective_batch_size {effective_batch_size}); lower effective_batch_size"
            )
        dropped = n - self.updates_per_epoch * effective_batch_size
        if dropped and rank == 0:
            logger.info(
                "each epoch uses %d of %d samples (%d updates of %d); the rest is left out",
                n - dropped,
                n,
                self.updates_per_epoch,
                effective_batch_size,
            )
        kwargs: dict[str, Any] = {}
        if collate_fn is not None:
            kwargs["collate_fn"] = collate_fn
        self.generator = torch.Generator()
        self.loader = DataLoader(
            dataset,
            batch_sampler=self.sampler,
            num_workers=num_workers,
            generator=self.generator,
            pin_memory=pin_memory,
            **kwargs,
        )

    def epoch(self, epoch: int, done_updates: int) -> Iterator[Any]:
        """The batches of `epoch` after its first `done_updates` updates (a resume mid-epoch
        continues with the very batch an uninterrupted run would see next)."""
        self.sampler.set_epoch(epoch, done_updates * self.accumulation_steps)
        self.generator.manual_seed(self.seed + epoch)
        return iter(self.loader)
