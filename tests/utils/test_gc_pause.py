"""Cyclic garbage collection waits while a save is taken or written (any thread), and comes
back exactly as the user had it once the last save is written."""

from __future__ import annotations

import gc
import os
import threading

import pytest
import torch

from ksuit.utils import gc_pause
from ksuit.utils.gc_pause import gc_paused


@pytest.fixture(autouse=True)
def collector_on():
    was = gc.isenabled()
    gc.enable()
    yield
    (gc.enable if was else gc.disable)()


def test_pauses_nest_across_threads_and_the_last_one_ends_the_pause():
    gc_pause.hold()  # an asynchronous save in flight
    assert not gc.isenabled()
    inner_done = threading.Event()

    def writer_thread():
        with gc_paused():
            assert not gc.isenabled()
        inner_done.set()

    threading.Thread(target=writer_thread).start()
    assert inner_done.wait(10)
    assert not gc.isenabled()  # the other thread's pause ended, ours has not
    gc_pause.release()
    assert gc.isenabled()


def test_a_user_who_turned_collection_off_keeps_it_off():
    gc.disable()
    with gc_paused():
        pass
    assert not gc.isenabled()


def test_back_to_back_pauses_collect_once_the_limit_has_passed(monkeypatch):
    collected = []
    monkeypatch.setattr(gc, "collect", lambda *a: collected.append(a) or 0)
    monkeypatch.setattr(gc_pause, "MAX_PAUSE_SECONDS", 0.0)
    gc_pause.hold()
    with gc_paused():  # ends while the outer pause goes on: past the limit, one collection
        pass
    assert len(collected) == 1 and not gc.isenabled()
    gc_pause.release()
    assert gc.isenabled() and len(collected) == 1  # the last pause just enables it again


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_collects_again_although_the_parent_is_paused():
    gc_pause.hold()
    try:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through the pipe
            os.write(w, b"1" if gc.isenabled() else b"0")
            os._exit(0)
        os.close(w)
        assert os.read(r, 1) == b"1"
        os.waitpid(pid, 0)
        os.close(r)
        assert not gc.isenabled()  # the parent's save is still in flight
    finally:
        gc_pause.release()
    assert gc.isenabled()


def test_an_async_save_pauses_collection_until_it_is_written_then_restores_it(tmp_path, monkeypatch):
    from ksuit.storage import AsyncSetWriter, PendingFile

    writer = AsyncSetWriter(tmp_path / "ckpt")
    seen = []
    gate = threading.Event()
    real = writer.set_writer.write_set

    def write_set(*args, **kwargs):
        gate.wait(10)
        seen.append(gc.isenabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(writer.set_writer, "write_set", write_set)
    payload = {"state_dict": {f"w{i}": torch.full((4,), float(i)) for i in range(50)}}
    writer.write_set([PendingFile("m_cp=E1_model.th", payload, "torch", "model", "m", "E1", {"epoch": 1})])
    assert not gc.isenabled()  # queued, not yet written: the save's objects are alive
    gate.set()
    writer.flush()
    assert seen == [False] and gc.isenabled()
    writer.close()
