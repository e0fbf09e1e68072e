"""A full disk, for real: an 8 MiB tmpfs mounted by the test.

A save that does not fit raises `OSError(errno.ENOSPC)` naming the path, the bytes needed and
the bytes free, leaves no partial or temporary file, and the previous checkpoint stays intact
and loadable: both when the free-space check catches it and when the disk fills up while the
bytes are being written.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import uuid

import pytest
import torch

import ksuit.storage.local as transaction
from ksuit.layout import is_journal_filename, is_temp_filename
from ksuit.providers import PathProvider
from ksuit.readers import scan_sets, select_resume_set
from ksuit.storage import load_file
from ksuit.storage.local.files import write_file_atomic
from ksuit.utils.training import TrainingIteration, UpdateCounter
from ksuit.writers.checkpoint_writer import CheckpointWriter
from tests.conftest import FakeTrainer, autoencoder_config, train_one_step

MIB = 1 << 20


@pytest.fixture
def small_disk(tmp_path):
    mount_point = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture
def saved_run(small_disk):
    """A run on the small disk with one complete, small checkpoint set."""
    from ksuit.zoo.autoencoder import Autoencoder

    provider = PathProvider(small_disk, "run")
    counter = UpdateCounter(None, TrainingIteration(epoch=5), updates_per_epoch=10, effective_batch_size=4)
    model = Autoencoder(autoencoder_config()).initialize()
    train_one_step(model)
    counter.next_update()
    writer = CheckpointWriter(provider, counter)
    writer.save(
        model, "E0_U1_S0", trainer=FakeTrainer(counter), save_latest_weights=True, save_latest_optim=True
    )
    return provider, counter, writer


def snapshot(folder):
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def assert_old_set_intact(provider, before):
    folder = provider.checkpoint_path
    names = os.listdir(folder)
    assert not [n for n in names if is_temp_filename(n) or is_journal_filename(n)], names
    assert snapshot(folder) == before
    chosen, skipped = select_resume_set(provider.run_output_path, "autoencoder")
    assert skipped == []
    assert str(chosen.training_iteration) == "E0_U1_S0"
    assert all(s.ok for s in scan_sets(provider.run_output_path, checksum=True))
    for info in chosen.files.values():
        load_file(info.path)


def assert_enospc_message(err: OSError, folder) -> None:
    assert err.errno == errno.ENOSPC
    message = str(err)
    assert str(folder) in message
    needed, free = re.search(
        r"needs (?:at least )?(\d+) bytes but only (-?\d+) bytes are free", message
    ).groups()
    assert 0 <= int(free) < int(needed)


def big_state(nbytes: int) -> dict:
    return {"big": torch.zeros(nbytes // 4), "small": torch.ones(3)}


def test_free_space_check_refuses_a_save_that_cannot_fit(saved_run):
    provider, counter, writer = saved_run
    folder = provider.checkpoint_path
    before = snapshot(folder)
    counter.next_update()
    with pytest.raises(OSError) as info:
        writer.save_model_checkpoint("big_cp=E0_U2_S0_model.th", big_state(12 * MIB), "E0_U2_S0")
    assert_enospc_message(info.value, folder)
    needed = int(re.search(r"needs (\d+) bytes", str(info.value)).group(1))
    assert needed >= 12 * MIB
    assert "big_cp=E0_U2_S0_model.th" in str(info.value)
    assert_old_set_intact(provider, before)


def fill_after_the_check(monkeypatch, filler, leave: int, check_first: bool) -> None:
    """Another writer takes the disk right after the free-space check: a filler file leaves
    `leave` bytes free (`check_first`: the real check runs before, and passes)."""
    real_check = transaction.check_free_space

    def check_then_fill(where, needed, what=None):
        if check_first:
            real_check(where, needed, what)
        free = os.statvfs(where).f_bavail * os.statvfs(where).f_frsize
        with open(filler, "wb") as f:
            f.write(b"\0" * max(0, free - leave))

    monkeypatch.setattr(transaction, "check_free_space", check_then_fill)


def test_disk_filling_up_during_the_write(saved_run, monkeypatch):
    """The check passes, then another writer takes the space: the write itself hits ENOSPC."""
    provider, counter, writer = saved_run
    folder = provider.checkpoint_path
    before = snapshot(folder)
    filler = folder.parent / "filler.bin"
    # leave ~1 MiB after the check passed: the 4 MiB state starts but cannot finish
    fill_after_the_check(monkeypatch, filler, leave=MIB, check_first=True)
    counter.next_update()
    with pytest.raises(OSError) as info:
        writer.save_model_checkpoint("big_cp=E0_U2_S0_model.th", big_state(4 * MIB), "E0_U2_S0")
    assert_enospc_message(info.value, folder)
    filler.unlink()
    assert_old_set_intact(provider, before)


def test_disk_filling_up_during_a_multi_file_save(saved_run, monkeypatch):
    """The latest set is being rewritten when the disk fills: the old latest stands."""
    from ksuit.zoo.autoencoder import Autoencoder

    provider, counter, writer = saved_run
    folder = provider.checkpoint_path
    before = snapshot(folder)
    filler = folder.parent / "filler.bin"
    # room for a few files of the set, not all (the check itself is skipped)
    fill_after_the_check(monkeypatch, filler, leave=40 * 1024, check_first=False)
    model = Autoencoder(autoencoder_config()).initialize()
    train_one_step(model)
    counter.next_update()
    with pytest.raises(OSError) as info:
        writer.save(
            model, "E0_U2_S0", trainer=FakeTrainer(counter), save_latest_weights=True, save_latest_optim=True
        )
    assert info.value.errno == errno.ENOSPC
    assert str(folder) in str(info.value)
    filler.unlink()
    assert_old_set_intact(provider, before)


def test_single_atomic_file_on_a_full_disk(small_disk):
    target = small_disk / "blob.bin"
    target.write_bytes(b"old")
    with pytest.raises(OSError) as info:
        write_file_atomic(target, lambda sink: [sink.write(b"\1" * MIB) for _ in range(16)])
    assert info.value.errno == errno.ENOSPC
    assert str(target) in str(info.value)
    assert sorted(os.listdir(small_disk)) == ["blob.bin"]
    assert target.read_bytes() == b"old"


def test_torch_save_running_out_of_space_is_reported_as_enospc(small_disk):
    """torch.save turns the OSError of its sink into "enforce fail at inline_container.cc";
    ksuit still reports ENOSPC with the path, needed and free bytes."""
    target = small_disk / "state.th"
    with pytest.raises(OSError) as info:
        write_file_atomic(target, lambda sink: torch.save(big_state(16 * MIB), sink))
    assert info.value.errno == errno.ENOSPC
    assert "inline_container" not in str(info.value)
    assert_enospc_message(info.value, small_disk)
    assert os.listdir(small_disk) == []


def test_async_save_on_a_full_disk_reports_enospc_at_flush(saved_run):
    provider, counter, _ = saved_run
    folder = provider.checkpoint_path
    before = snapshot(folder)
    counter.next_update()
    writer = CheckpointWriter(provider, counter, async_save=True)
    writer.save_model_checkpoint("big_cp=E0_U2_S0_model.th", big_state(12 * MIB), "E0_U2_S0")
    with pytest.raises(OSError) as info:
        writer.flush()
    # the background ENOSPC is re-raised as itself on the caller's thread
    assert_enospc_message(info.value, folder)
    writer.close()
    assert_old_set_intact(provider, before)
