"""Reproducible data order: a seeded permutation per epoch, sharded over ranks, resumable
mid-epoch, on any number of ranks.

Epoch `e` visits the samples in `torch.randperm(n)` drawn from a generator seeded with
`seed + e` (exactly `DistributedSampler`'s scheme, which shards it over ranks: rank `r` of `W`
takes `order[r::W]`). Each rank batches its shard in order, so the `i`-th batches of all ranks
together are exactly `order[i*G:(i+1)*G]` (`G = W * batch_size`, the global batch of one forward
pass): which samples a global step holds does not depend on the world size, only how they are
dealt to the ranks does. Resuming in the middle of an epoch sets `skip_batches`: the same
permutation is drawn and the steps already consumed are left out, so the run continues with
the very samples it would have seen next, on the same number of ranks or another one (elastic
resume keeps the global batch): every remaining sample of the epoch exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import BatchSampler, DistributedSampler, Sampler


def epoch_order(dataset_len: int, seed: int, epoch: int) -> list[int]:
    """The global sequence of the samples of `epoch` (what `DistributedSampler` shuffles to)."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    order: list[int] = torch.randperm(dataset_len, generator=g).tolist()
    return order


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of `batch_size` indices (the last partial batch dropped) for one rank.

    Call `set_epoch(epoch, skip_batches)` before iterating; `len()` is the number of batches of
    a full epoch, whatever was skipped.
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
        self.sampler: DistributedSampler[int] = DistributedSampler(
            range(dataset_len),  # type: ignore[arg-type]  # the stubs ask for a Dataset; len() is all it uses
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=True,
        )
        self.batch_sampler = BatchSampler(self.sampler, batch_size, drop_last=True)
        self.batch_size = batch_size
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        if not 0 <= skip_batches <= len(self):
            raise ValueError(f"cannot skip {skip_batches} batches of an epoch of {len(self)}")
        self.sampler.set_epoch(epoch)
        self.skip_batches = skip_batches

    def __iter__(self) -> Iterator[list[int]]:
        for i, batch in enumerate(self.batch_sampler):
            if i >= self.skip_batches:
                yield batch

    def __len__(self) -> int:
        return len(self.batch_sampler)
