"""A full disk on any machine: the write system calls themselves fail with ENOSPC part-way
(tests/storage/test_disk_full.py does it for real on a tmpfs, which needs root to mount).

Whatever path the bytes take (buffered writes, the O_DIRECT stream, torch.save's own writer,
the async background thread), the save raises `OSError(ENOSPC)` naming the file, leaves no
temporary file, and the previous set still verifies and loads.
"""

from __future__ import annotations

import errno
import os

import pytest
import torch

from ksuit.readers import scan_sets, select_resume_set
from ksuit.storage.local import direct_io, staging
from ksuit.writers import CheckpointWriter
from tests.conftest import FakeTrainer, save_resumable_set

MIB = 1 << 20


def run_out_of_space_after(monkeypatch, budget: int) -> list[int]:
    """`os.write` and `os.pwrite` of checkpoint temp files fail with ENOSPC once `budget` bytes
    went out (other files, e.g. pytest's, are not affected). Returns the bytes-written counter."""
    written = [0]
    real_write, real_pwrite = os.write, os.pwrite

    def is_temp(fd: int) -> bool:
        try:
            return os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp")
        except OSError:
            return False

    def spend(fd: int, n: int) -> None:
        if is_temp(fd):
            if written[0] + n > budget:
                raise OSError(errno.ENOSPC, "No space left on device")
            written[0] += n

    def write(fd, data):
        spend(fd, memoryview(data).nbytes)
        return real_write(fd, data)

    def pwrite(fd, data, offset):
        spend(fd, memoryview(data).nbytes)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "pwrite", pwrite)
    return written


def names(folder) -> list[str]:
    return sorted(os.listdir(folder))


def assert_full_disk_error(error: BaseException, filename: str) -> None:
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC, repr(error)
    assert filename in str(error) and "needs" in str(error)
    assert "inline_container" not in str(error)  # the disk's error, not torch's wrapper of it


@pytest.fixture
def saved(path_provider, update_counter):
    save_resumable_set(path_provider, update_counter)
    return path_provider, update_counter


@pytest.mark.parametrize("route", ["in_memory", "buffered", "o_direct"])
def test_a_save_running_out_of_space_part_way(saved, monkeypatch, route):
    provider, counter = saved
    folder = provider.checkpoint_path
    before = names(folder)
    if route != "in_memory":  # streamed in pieces instead of serialized first, written at once
        monkeypatch.setattr(staging, "IN_MEMORY_BYTES", 0)
    if route == "o_direct":  # every file through the O_DIRECT stream, in 3-block bounce buffers
        monkeypatch.setattr(staging, "MIN_DIRECT_BYTES", 0)
        monkeypatch.setattr(direct_io, "MIN_DIRECT_BYTES", 0)
        monkeypatch.setattr(direct_io, "BOUNCE_BYTES", 3 * direct_io.BLOCK)
    streams = []
    original_init = direct_io.DirectStream.__init__
    monkeypatch.setattr(
        direct_io.DirectStream, "__init__", lambda self, sink: streams.append(original_init(self, sink))
    )
    written = run_out_of_space_after(monkeypatch, budget=MIB // 2)
    counter.next_update()
    big = {"w": torch.randn(MIB // 4)}  # 1 MiB of tensor bytes: cannot finish
    with pytest.raises(OSError) as info:
        CheckpointWriter(provider, counter).save_model_checkpoint("big_cp=E0_U2_S0_model.th", big, "E0_U2_S0")
    monkeypatch.undo()
    assert bool(streams) == (route == "o_direct")  # the route the case names was taken
    if route != "in_memory":
        assert written[0] > 0  # the write really started before the disk ran out
    assert_full_disk_error(info.value, "big_cp=E0_U2_S0_model.th")
    assert names(folder) == before  # no temporary file left behind
    assert all(s.ok for s in scan_sets(provider.run_output_path, checksum=True))
    chosen, skipped = select_resume_set(provider.run_output_path, "autoencoder")
    assert chosen.training_iteration.update == 1 and skipped == []


def test_a_multi_file_set_running_out_of_space_keeps_the_old_latest(saved, monkeypatch):
    from ksuit.zoo.autoencoder import Autoencoder
    from tests.conftest import autoencoder_config, train_one_step

    provider, counter = saved
    folder = provider.checkpoint_path
    before = names(folder)
    model = Autoencoder(autoencoder_config()).initialize()
    train_one_step(model)
    counter.next_update()
    run_out_of_space_after(monkeypatch, budget=20 * 1024)  # a few files of the set, not all
    with pytest.raises(OSError) as info:
        CheckpointWriter(provider, counter).save(
            model, "E0_U2_S0", trainer=FakeTrainer(counter), save_latest_weights=True, save_latest_optim=True
        )
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC and str(folder) in str(info.value)
    assert names(folder) == before
    chosen, _ = select_resume_set(provider.run_output_path, "autoencoder")
    assert chosen.tag == "latest" and chosen.training_iteration.update == 1


def test_an_async_save_running_out_of_space_reports_enospc_at_flush(saved, monkeypatch):
    provider, counter = saved
    folder = provider.checkpoint_path
    before = names(folder)
    counter.next_update()
    writer = CheckpointWriter(provider, counter, async_save=True)
    run_out_of_space_after(monkeypatch, budget=MIB // 2)
    writer.save_model_checkpoint("big_cp=E0_U2_S0_model.th", {"w": torch.randn(MIB // 4)}, "E0_U2_S0")
    with pytest.raises(OSError) as info:
        writer.flush()  # the background thread's ENOSPC, re-raised as itself here
    monkeypatch.undo()
    writer.close()
    assert_full_disk_error(info.value, "big_cp=E0_U2_S0_model.th")
    assert names(folder) == before
