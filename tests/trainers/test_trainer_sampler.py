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


def global_steps(n, batch_size, world, epoch, skip=0):
    """The samples of each global step, over `world` ranks each drawing `batch_size`."""
    per_rank = [
        batches(ResumableBatchSampler(n, batch_size, seed=7, num_replicas=world, rank=r), epoch, skip)
        for r in range(world)
    ]
    return [sorted(i for rank in per_rank for i in rank[step]) for step in range(len(per_rank[0]))]


def test_the_samples_of_a_global_step_do_not_depend_on_the_world_size():
    expected = global_steps(60, 12, 1, epoch=3)
    for world in (2, 3, 4, 6):
        assert global_steps(60, 12 // world, world, epoch=3) == expected, world


@pytest.mark.parametrize("saved_world, resumed_world", [(2, 3), (2, 1), (4, 2), (3, 4)])
def test_a_resume_on_another_world_size_sees_every_remaining_sample_once(saved_world, resumed_world):
    for done in range(6):  # steps of the epoch done before the resume
        before = global_steps(75, 12 // saved_world, saved_world, epoch=1)[:done]
        after = global_steps(75, 12 // resumed_world, resumed_world, epoch=1, skip=done)
        seen = [i for step in before + after for i in step]
        assert len(seen) == len(set(seen)) == 72  # 6 steps of 12; the 3 left over are dropped


def test_one_rank_draws_exactly_what_distributed_and_batch_samplers_draw():
    from torch.utils.data import BatchSampler, DistributedSampler

    reference = DistributedSampler(range(22), num_replicas=1, rank=0, shuffle=True, seed=5, drop_last=True)
    reference.set_epoch(4)
    assert batches(ResumableBatchSampler(22, 4, seed=5), 4) == list(
        BatchSampler(reference, 4, drop_last=True)
    )
