"""Reproducible data order, independent of the world size, resumable at any update on any number
of ranks.

Epoch `e` visits the samples in one global sequence, `torch.randperm(n)` drawn from a generator
seeded with `seed + e` (the permutation `DistributedSampler` draws). The sequence is cut into
steps of `world_size * batch_size` samples (the global batch of one forward pass; the last
partial step is dropped) and rank `r` takes the `r`-th slice of `batch_size` samples of each
step. So the samples of global step `i` are the same whatever the world size, and a run stopped
after `k` steps of an epoch on N ranks continues on M ranks with step `k`: every remaining
sample of the epoch exactly once, none twice (`set_epoch(epoch, skip_batches=k)`). With one rank
the batches are exactly those of `DistributedSampler` + `BatchSampler(drop_last=True)`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def epoch_order(dataset_len: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The global sequence of the samples of `epoch`."""
    if not shuffle:
        return list(range(dataset_len))
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    order: list[int] = torch.randperm(dataset_len, generator=g).tolist()
    return order


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of `batch_size` indices of one rank (see the module docstring).

    Call `set_epoch(epoch, skip_batches)` before iterating; `len()` is the number of batches of
    a full epoch (the same on every rank), whatever was skipped.
    """

    def __init__(
        self,
        dataset_len: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not one of {num_replicas} replicas")
        self.dataset_len = dataset_len
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        if not 0 <= skip_batches <= len(self):
            raise ValueError(f"cannot skip {skip_batches} batches of an epoch of {len(self)}")
        self.epoch = epoch
        self.skip_batches = skip_batches

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_order(self.dataset_len, self.seed, self.epoch, self.shuffle)
        step = self.batch_size * self.num_replicas
        for i in range(self.skip_batches, len(self)):
            start = i * step + self.rank * self.batch_size
            yield order[start : start + self.batch_size]

    def __len__(self) -> int:
        return self.dataset_len // (self.batch_size * self.num_replicas)
