"""The disk budget: before a save is written, sets the policy may delete go, oldest first, until
the save fits in `max_bytes` and leaves `min_free_bytes` free; when it cannot fit the save fails
with ENOSPC naming the bytes needed, the budget and what is protected, before anything is
written or deleted."""

from __future__ import annotations

import errno

import pytest

import ksuit.retention.apply as apply_module
import ksuit.retention.planner as planner
from ksuit.retention import RetentionPolicy, pin
from ksuit.storage import LocalBackend
from tests.retention.helpers import Saver, bytes_on_disk, progress_tags, resume_tag
from tests.storage.test_journal_safety import tree


def estimate(saver: Saver) -> int:
    """What the budget reserves for the next save of `saver` (the files' sizes last time)."""
    captured = []
    real = planner.plan

    def plan(folder, policy, now_ns, incoming=0, defer_rules=False):
        captured.append(incoming)
        raise RuntimeError("probe")

    planner_module = apply_module
    planner_module.plan = plan
    saver.restart(RetentionPolicy(max_bytes=10**12))
    try:
        with pytest.raises(RuntimeError, match="probe"):
            saver.save()
    finally:
        planner_module.plan = real
    saver.restart()
    return captured[0]


def test_the_oldest_sets_make_room_and_the_folder_stays_within_max_bytes(tmp_path):
    probe = Saver(tmp_path / "probe")
    probe.save()
    one = bytes_on_disk(probe.folder)
    probe.save()
    per_set = bytes_on_disk(probe.folder) - one
    needed = estimate(probe)
    assert per_set < needed < 2 * one  # close to what a save really adds (its sizes last time)
    budget = one + 3 * per_set
    saver = Saver(tmp_path / "run")
    seen = [saver.save()]  # a save never written before is estimated from its tensors: generously
    saver.restart(RetentionPolicy(max_bytes=budget))  # a budget, no rule
    for _ in range(11):
        seen.append(saver.save())
        assert bytes_on_disk(saver.folder) <= budget
        kept = progress_tags(saver.run_dir)
        assert kept == seen[-len(kept) :], "eviction goes oldest first"
        assert resume_tag(saver.run_dir) == "latest"
    assert 1 <= len(progress_tags(saver.run_dir)) <= 3


def test_a_save_that_cannot_fit_fails_before_writing_or_deleting_anything(tmp_path):
    saver = Saver(tmp_path)
    first = saver.save()
    second = saver.save()
    pin(saver.run_dir, first)
    used = bytes_on_disk(saver.folder)
    saver.restart(RetentionPolicy(keep_last=1, max_bytes=used + 1000))
    before = tree(saver.folder)
    with pytest.raises(OSError) as info:
        saver.save()
    error = info.value
    assert error.errno == errno.ENOSPC
    message = str(error)
    assert "the next save needs about" in message and "max_bytes" in message
    assert f"autoencoder@{first}" in message and "pinned" in message  # what is protected
    assert f"autoencoder@{second}" not in message.split("protected:")[1]  # evictable, yet not enough
    assert "Nothing was written or deleted" in message
    assert tree(saver.folder) == before


def test_min_free_bytes_keeps_the_disk_from_filling(tmp_path, monkeypatch):
    """A small disk (simulated): free = capacity - what the folder holds."""
    probe = Saver(tmp_path / "probe")
    probe.save()
    one = bytes_on_disk(probe.folder)
    probe.save()
    per_set = bytes_on_disk(probe.folder) - one
    needed = estimate(probe)
    reserve = 1000
    capacity = needed + reserve + one + 2 * per_set  # room for latest and about three progress sets
    saver = Saver(tmp_path / "run")
    saver.save()
    saver.restart(RetentionPolicy(keep_last=5, min_free_bytes=reserve))
    monkeypatch.setattr(LocalBackend, "free_bytes", lambda self: capacity - bytes_on_disk(saver.folder))
    for _ in range(8):
        saver.save()
        assert capacity - bytes_on_disk(saver.folder) >= reserve  # never below the reserve
    assert 1 <= len(progress_tags(saver.run_dir)) <= 3


def test_an_asynchronous_save_that_cannot_fit_raises_enospc_at_flush(tmp_path):
    saver = Saver(tmp_path)
    saver.save()
    saver.restart(RetentionPolicy(max_bytes=bytes_on_disk(saver.folder) + 10), async_save=True)
    saver.save()
    with pytest.raises(OSError) as info:
        saver.writer.flush()
    assert info.value.errno == errno.ENOSPC and "retention budget" in str(info.value)
