"""Snapshot memory prepared before the first save: mapped at once, touched in the background, and
a save that comes before it is ready waits only for what it needs that is not ready."""

import threading
import time

import pytest
import torch

from ksuit.storage import host_memory
from ksuit.storage.host_memory import Segment
from ksuit.storage.snapshot import SnapshotPool, take_snapshot

CHUNK = 64 << 10


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(host_memory, "TOUCH_CHUNK", CHUNK)


def _payload(nbytes: int, value: float) -> dict:
    return {"w": torch.full((nbytes // 4,), value)}


def _offset(t: torch.Tensor, segment: Segment) -> int:
    return t.data_ptr() - segment.tensor.data_ptr()


def test_prepare_maps_memory_at_once_touches_it_in_the_background_and_the_first_save_uses_it(small_chunks):
    pool = SnapshotPool(2)
    pool.prepare(4 * CHUNK)
    assert [b.nbytes for b in pool.buffers] == [4 * CHUNK, 4 * CHUNK]  # max_pending x nbytes
    assert pool.wait_prepared(timeout=30)
    for buffer in pool.buffers:
        (segment,) = buffer.segments
        assert segment.touched == 4 * CHUNK
    buffer = pool.acquire()
    snap = take_snapshot([_payload(3 * CHUNK, 2.0)], buffer)[0]["w"]
    (segment,) = buffer.segments  # no memory beyond the prepared one
    assert 0 <= _offset(snap, segment) < segment.nbytes
    assert torch.equal(snap, torch.full((3 * CHUNK // 4,), 2.0))
    pool.prepare(4 * CHUNK)  # as much already: nothing more
    assert [b.nbytes for b in pool.buffers] == [4 * CHUNK, 4 * CHUNK]


def test_a_save_before_the_memory_is_ready_does_not_wait_for_the_rest_and_the_toucher_skips_its_range(
    small_chunks, monkeypatch
):
    calls, paused, gate = [], threading.Event(), threading.Event()
    original = Segment.touch_next

    def touch_next(self, touch):
        calls.append(self.touched)
        if len(calls) == 2:  # between chunks: chunk 0 touched, nothing in flight
            paused.set()
            assert gate.wait(30)
        return original(self, touch)

    monkeypatch.setattr(Segment, "touch_next", touch_next)
    pool = SnapshotPool(1)
    pool.prepare(6 * CHUNK)
    assert paused.wait(30)
    buffer = pool.acquire()
    (segment,) = buffer.segments
    assert segment.touched == CHUNK
    # needs 3 chunks, 2 of them not touched: the save faults them in itself instead of waiting
    # for the preparation (were it waiting, this would never return: the toucher is held)
    snap = take_snapshot([_payload(3 * CHUNK, 5.0)], buffer)[0]["w"]
    assert torch.equal(snap, torch.full((3 * CHUNK // 4,), 5.0))
    assert segment.claimed == 3 * CHUNK
    gate.set()
    assert pool.wait_prepared(timeout=30)
    # the toucher went on after the claimed range: it touched chunks 0, 3, 4, 5 and never 1 or 2
    assert calls[:3] == [0, CHUNK, 4 * CHUNK] and segment.touched == 6 * CHUNK
    assert torch.equal(snap, torch.full((3 * CHUNK // 4,), 5.0))  # and wrote nothing into it


def test_a_save_waits_for_a_chunk_being_touched_in_its_range_and_only_for_that(small_chunks, monkeypatch):
    inside, gate = threading.Event(), threading.Event()
    starts = []

    def touch(chunk):  # zeroes the whole chunk: a copy that raced it would be lost
        starts.append(chunk.data_ptr())
        if len(starts) == 2:
            inside.set()
            assert gate.wait(30)
        chunk.zero_()

    monkeypatch.setattr(host_memory, "touch_pages", touch)
    pool = SnapshotPool(1)
    pool.prepare(4 * CHUNK)
    assert inside.wait(30)  # chunk 1 is being touched
    buffer = pool.acquire()
    (segment,) = buffer.segments
    # within chunk 0 (touched): no wait although the toucher is held inside chunk 1
    small = take_snapshot([_payload(CHUNK // 2, 1.0)], buffer)[0]["w"]
    assert torch.equal(small, torch.full((CHUNK // 8,), 1.0))
    results = []
    saver = threading.Thread(target=lambda: results.append(take_snapshot([_payload(3 * CHUNK, 7.0)], buffer)))
    saver.start()
    deadline = time.monotonic() + 30
    while segment.claimed < 3 * CHUNK:  # the saver took its range while chunk 1 is in flight
        assert time.monotonic() < deadline, "the save never claimed its memory"
        time.sleep(0.001)
    assert saver.is_alive()  # ... and waits for that chunk
    gate.set()
    saver.join(30)
    assert not saver.is_alive()
    assert torch.equal(results[0][0]["w"], torch.full((3 * CHUNK // 4,), 7.0))
    assert pool.wait_prepared(timeout=30)
    assert [p - segment.tensor.data_ptr() for p in starts] == [0, CHUNK, 3 * CHUNK]


def test_prepared_memory_that_falls_short_gets_only_the_rest_and_later_growth_replaces_it(small_chunks):
    pool = SnapshotPool(1)
    pool.prepare(2 * CHUNK)
    assert pool.wait_prepared(timeout=30)
    buffer = pool.acquire()
    prepared = buffer.segments[0]
    payload = {"a": torch.full((CHUNK // 4,), 1.0), "b": torch.full((2 * CHUNK // 4,), 2.0)}
    snap = take_snapshot([payload, {"c": torch.arange(CHUNK // 8)}], buffer)
    assert buffer.segments[0] is prepared and len(buffer.segments) == 2  # the prepared one kept
    assert buffer.nbytes == 2 * CHUNK + 3 * CHUNK  # prepared + the region of a and b, which did not fit
    assert 0 <= _offset(snap[1]["c"], prepared) < 2 * CHUNK  # c's region did
    assert torch.equal(snap[0]["b"], payload["b"]) and torch.equal(snap[1]["c"], torch.arange(CHUNK // 8))
    bigger = {"a": torch.ones(8 * CHUNK // 4)}
    take_snapshot([bigger], buffer)
    assert len(buffer.segments) == 1 and buffer.nbytes == 8 * CHUNK  # never more than the largest save


def test_closing_the_pool_stops_the_toucher(small_chunks, monkeypatch):
    calls = []
    original = Segment.touch_next

    def touch_next(self, touch):
        calls.append(1)
        return original(self, touch)

    monkeypatch.setattr(Segment, "touch_next", touch_next)
    pool = SnapshotPool(1)
    pool.close()
    pool.prepare(64 * CHUNK)  # after close: mapped, never touched
    assert pool.wait_prepared(timeout=30) and calls == []
