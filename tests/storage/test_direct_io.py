"""The O_DIRECT stream keeps writing during interpreter shutdown, when the exit flush of queued
asynchronous saves runs: no `concurrent.futures` pool (it refuses work then), and inline writes
where no helper thread can be started."""

import threading
from concurrent.futures import thread as futures_thread

import pytest
import torch

from ksuit.storage.formats import get_format
from ksuit.storage.local import direct_io
from ksuit.storage.local.files import HashingSink
from ksuit.storage.local.safe_files import hash_regular_file as hash_file

PAYLOAD = {"state_dict": {f"t{i}": torch.full((3000 + 37 * i,), float(i)) for i in range(8)}, "tag": "E1"}


def _write_direct(path, monkeypatch) -> HashingSink:
    monkeypatch.setenv("KSUIT_DIRECT_IO", "1")
    monkeypatch.setattr(direct_io, "MIN_DIRECT_BYTES", 0)
    monkeypatch.setattr(direct_io, "BOUNCE_BYTES", 3 * direct_io.BLOCK)  # many block writes
    used = []
    original_init = direct_io.DirectStream.__init__

    def init(self, sink):
        original_init(self, sink)
        used.append(self)

    monkeypatch.setattr(direct_io.DirectStream, "__init__", init)
    sink = HashingSink(path)
    with direct_io.open_stream(sink, direct_io.MIN_DIRECT_BYTES) as out:
        get_format("torch").write(PAYLOAD, out)
    sink.fsync_and_close()
    if not used:
        pytest.skip("this file system takes no O_DIRECT writes")
    return sink


def _assert_file_is_payload(path, sink) -> None:
    assert hash_file(path) == (sink.nbytes, sink.hexdigest())
    loaded = torch.load(path, weights_only=True)
    for key, value in PAYLOAD["state_dict"].items():
        assert torch.equal(loaded["state_dict"][key], value), key


def test_direct_stream_writes_after_interpreter_shutdown_began(tmp_path, monkeypatch):
    # what concurrent.futures sets when shutdown begins, before atexit handlers run
    monkeypatch.setattr(futures_thread, "_shutdown", True)
    path = tmp_path / "f.th"
    sink = _write_direct(path, monkeypatch)
    _assert_file_is_payload(path, sink)


def test_direct_stream_writes_inline_when_no_thread_can_start(tmp_path, monkeypatch):
    def refuse(self):
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    path = tmp_path / "f.th"
    sink = _write_direct(path, monkeypatch)
    _assert_file_is_payload(path, sink)


def test_a_failed_block_write_reaches_the_writer(tmp_path, monkeypatch):
    def failing(self, view, offset):
        raise OSError(5, "simulated block write error")

    monkeypatch.setattr(direct_io.DirectStream, "_write_block", failing)
    with pytest.raises(OSError, match="simulated block write error"):
        _write_direct(tmp_path / "f.th", monkeypatch)
