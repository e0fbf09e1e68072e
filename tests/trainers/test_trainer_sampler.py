import pytest

from ksuit.trainers.sampler import ResumableBatchSampler


def batches(sampler, epoch, skip=0):
    sampler.set_epoch(epoch, skip)
    return list(sampler)


def test_order_depends_only_on_seed_and_epoch():
    a, b = ResumableBatchSampler(20, 4, seed=3), ResumableBatchSampler(20, 4, seed=3)
    assert batches(a, 0) == batches(b, 0)
    assert batches(a, 1) != batches(a, 0)
    assert batches(ResumableBatchSampler(20, 4, seed=4), 0) != batches(a, 0)
    assert sorted(i for batch in batches(a, 2) for i in batch) == list(range(20))


def test_skipping_resumes_with_the_next_batch():
    sampler = ResumableBatchSampler(22, 4, seed=0)
    full = batches(sampler, 5)
    assert len(full) == len(sampler) == 5  # the partial batch of 2 is dropped
    assert batches(sampler, 5, skip=3) == full[3:]
    with pytest.raises(ValueError, match="cannot skip 6"):
        sampler.set_epoch(0, 6)


def test_ranks_get_disjoint_shards():
    shards = [batches(ResumableBatchSampler(16, 2, seed=0, num_replicas=2, rank=r), 0) for r in (0, 1)]
    flat = [set(i for b in s for i in b) for s in shards]
    assert not flat[0] & flat[1] and len(flat[0] | flat[1]) == 16
