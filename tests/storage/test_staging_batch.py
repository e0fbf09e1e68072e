"""Staged files are fsynced together, every one before the journal that names it exists; the
files a save replaces are let go of off the save's path, without leaking descriptors."""

import os
import threading
import time
from pathlib import Path

import torch

from ksuit.storage import PendingFile, SetWriter, load_file
from ksuit.storage.local import staging


def _files(n: int, value: float) -> list[PendingFile]:
    it = {"epoch": 1}
    return [
        PendingFile(
            f"net.part{i}_cp=latest_model.th",
            {"w": torch.full((64,), value)},
            "torch",
            "model",
            "net",
            "latest",
            it,
        )
        for i in range(n)
    ]


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def test_every_staged_file_is_fsynced_before_the_journal_is_created_in_one_batch(tmp_path, monkeypatch):
    events: list[tuple[str, str, int]] = []  # (what, name, thread)
    lock = threading.Lock()
    real_fsync, real_open = os.fsync, os.open

    def fsync(fd):
        with lock:
            events.append(("fsync", Path(_fd_path(fd)).name, threading.get_ident()))
        return real_fsync(fd)

    def open_(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and ".ksuit-journal" in str(path):
            with lock:
                events.append(("journal", Path(path).name, threading.get_ident()))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "open", open_)
    SetWriter(tmp_path).write(_files(20, 1.0))
    journal_at = next(i for i, e in enumerate(events) if e[0] == "journal")
    staged = {e[1] for e in events[:journal_at] if e[0] == "fsync" and e[1].endswith(".tmp")}
    # 20 files and the manifest, each durable before the journal is
    assert len(staged) == 21 and all(name.startswith(".net") for name in staged)
    assert len({e[2] for e in events[:journal_at] if e[0] == "fsync"}) > 1  # synced concurrently
    for i in range(20):
        assert torch.equal(
            load_file(tmp_path / f"net.part{i}_cp=latest_model.th")["w"], torch.full((64,), 1.0)
        )


def test_replaced_files_and_journals_are_let_go_of(tmp_path):
    writer = SetWriter(tmp_path)
    writer.write(_files(10, 0.0))
    before = len(os.listdir("/proc/self/fd"))
    for value in (1.0, 2.0, 3.0):
        writer.write(_files(10, value))  # replaces the 10 files and the manifest each time
    deadline = time.monotonic() + 30
    while len(os.listdir("/proc/self/fd")) > before:  # the helper thread closes what it held
        assert time.monotonic() < deadline, "descriptors of replaced files were never closed"
        time.sleep(0.01)
    assert torch.equal(load_file(tmp_path / "net.part3_cp=latest_model.th")["w"], torch.full((64,), 3.0))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temp or journal left


def test_a_failed_fsync_fails_the_save_before_the_journal_and_leaves_nothing(tmp_path, monkeypatch):
    SetWriter(tmp_path).write(_files(3, 1.0))
    before = sorted(os.listdir(tmp_path))
    real_fsync = os.fsync

    def fsync(fd):
        if _fd_path(fd).endswith(".tmp") and "part1" in _fd_path(fd):
            raise OSError(5, "simulated EIO on fsync")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    try:
        SetWriter(tmp_path).write(_files(3, 2.0))
    except OSError as e:
        assert "simulated EIO" in str(e)
    else:
        raise AssertionError("the save did not fail")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert sorted(os.listdir(tmp_path)) == before  # the old set, no temps, no journal
    assert torch.equal(load_file(tmp_path / "net.part1_cp=latest_model.th")["w"], torch.full((64,), 1.0))


def test_small_files_are_written_in_few_pieces(tmp_path, monkeypatch):
    writes = []
    real_write = os.write

    def write(fd, data):
        if _fd_path(fd).endswith(".tmp"):
            writes.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    SetWriter(tmp_path).write(_files(4, 1.0))
    assert len(writes) == 6  # one per file, the manifest and the journal (torch.save: ~50 pieces a file)
    assert staging.MAX_OPEN_STAGED >= 4
