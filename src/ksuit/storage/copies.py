"""Copying a snapshot's tensors with every core and without Python work per small tensor.

The bytes to copy are split into one share per thread (`torch.get_num_threads()`: the caller's
and helper threads), about equal in bytes and in memory order; each thread gets one hand-off per
save and copies its share with the GIL released:

- small tensors (under `LARGE_COPY_BYTES`): one `torch._foreach_copy_` over the share's list
  (no Python per tensor; one thread alone copies a list of small tensors at about half the speed
  of a parallel copy of the same bytes on the `make bench` machine);
- large contiguous CPU tensors: byte ranges with `memmove` (`ctypes` releases the GIL), a tensor
  split between threads where the shares meet. Not `copy_` per tensor: each `copy_` of a large
  tensor is a parallel region of torch's intra-op threads, and on a machine whose cores are busy
  each region waited for a time slice (24 tensors of 11 MiB: 367 ms against 128 ms for one copy
  of the same bytes);
- what `memmove` cannot copy (a large source with strides, or a conjugate or negative view):
  `copy_` on the caller's thread;
- CUDA sources: `copy_(non_blocking=True)` into pinned memory on a side stream per device that
  first waits for the current stream (what training queued on the tensors); the copies are
  queued before the CPU copies start and the side streams synchronized after them.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
from typing import Any, NamedTuple

import torch

LARGE_COPY_BYTES = 4 << 20
MIN_SPLIT_BYTES = 1 << 20  # fewer bytes than this are copied by the caller alone

Ranges = list[tuple[int, int, int, int]]  # (destination address, position, offset, nbytes)
Move = tuple[int, int, int]  # (destination address, source address, nbytes)


class Share(NamedTuple):
    """What one thread copies: small tensors, then byte ranges of large ones."""

    dsts: list[torch.Tensor]
    positions: list[int]
    ranges: Ranges


class CopyPlan(NamedTuple):
    """The copies of one snapshot; positions index the sources passed to `run_copies`."""

    shares: list[Share]
    strided: list[tuple[torch.Tensor, int]]  # large sources `memmove` cannot copy
    cuda: dict[torch.device, tuple[list[torch.Tensor], list[int]]]
    large: dict[int, list[torch.Tensor]]  # position -> destinations of the byte ranges


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def plan_copies(dsts: list[tuple[torch.Tensor, int]], sources: list[torch.Tensor], threads: int) -> CopyPlan:
    """Sorts `(destination, source position)` pairs (in memory order) into the kinds of copy and
    splits the CPU ones into at most `threads` shares of about equal bytes."""
    cpu: list[tuple[torch.Tensor, int, bool]] = []  # (destination, position, large)
    strided: list[tuple[torch.Tensor, int]] = []
    large: dict[int, list[torch.Tensor]] = {}
    cuda: dict[torch.device, tuple[list[torch.Tensor], list[int]]] = {}
    for dst, pos in dsts:
        src = sources[pos]
        if src.device.type == "cuda":
            entry = cuda.setdefault(src.device, ([], []))
            entry[0].append(dst)
            entry[1].append(pos)
        elif _nbytes(dst) < LARGE_COPY_BYTES:
            cpu.append((dst, pos, False))
        elif src.device.type == "cpu" and src.is_contiguous():
            cpu.append((dst, pos, True))
            large.setdefault(pos, []).append(dst)
        else:
            strided.append((dst, pos))
    total = sum(_nbytes(d) for d, _, _ in cpu)
    n = max(1, min(threads, total // MIN_SPLIT_BYTES))
    shares: list[Share] = [Share([], [], [])]
    room = total / n  # bytes the current share still takes
    for dst, pos, is_large in cpu:
        size = _nbytes(dst)
        if not is_large:
            if room <= 0 and len(shares) < n:
                shares.append(Share([], [], []))
                room = total / n
            shares[-1].dsts.append(dst)
            shares[-1].positions.append(pos)
            room -= size
            continue
        offset = 0
        while offset < size:
            if room <= 0 and len(shares) < n:
                shares.append(Share([], [], []))
                room = total / n
            take = size - offset if len(shares) == n else min(size - offset, max(int(room), 1))
            shares[-1].ranges.append((dst.data_ptr() + offset, pos, offset, take))
            offset += take
            room -= take
    return CopyPlan([s for s in shares if s.dsts or s.ranges], strided, cuda, large)


def _copy_share(
    dsts: list[torch.Tensor], srcs: list[torch.Tensor], ranges: list[tuple[int, int, int]]
) -> None:
    if dsts:
        with torch.no_grad():  # grad mode is per thread; sources may require grad
            torch._foreach_copy_(dsts, srcs)
    for dst, src, nbytes in ranges:
        ctypes.memmove(dst, src, nbytes)


class _Job:
    def __init__(self, work: tuple[Any, ...]):
        self.work = work
        self.done = threading.Event()
        self.error: BaseException | None = None


class _Helpers:
    """Threads that copy shares while the caller copies its own. Where no thread can be started
    (interpreter shutdown) the caller copies every share."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: list[queue.SimpleQueue[_Job]] = []

    def forget(self) -> None:
        """In a forked child: the helper threads stayed in the parent."""
        self._lock = threading.Lock()
        self._queues = []

    def _ensure(self, n: int) -> int:
        with self._lock:
            while len(self._queues) < n:
                jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
                thread = threading.Thread(
                    target=_serve, args=(jobs,), name="ksuit-snapshot-copy", daemon=True
                )
                try:
                    thread.start()
                except RuntimeError:  # can't create new thread at interpreter shutdown
                    break
                self._queues.append(jobs)
            return len(self._queues)

    def run(self, works: list[tuple[Any, ...]]) -> None:
        helpers = min(self._ensure(len(works) - 1), len(works) - 1) if len(works) > 1 else 0
        jobs = [_Job(work) for work in works[1 : helpers + 1]]
        for q, job in zip(self._queues, jobs, strict=False):
            q.put(job)
        try:
            for work in [works[0], *works[helpers + 1 :]]:
                _copy_share(*work)
        finally:
            for job in jobs:
                job.done.wait()
        for job in jobs:
            if job.error is not None:
                raise job.error


def _serve(jobs: queue.SimpleQueue[_Job]) -> None:
    while True:
        job = jobs.get()
        try:
            _copy_share(*job.work)
        except BaseException as e:  # re-raised on the caller's thread
            job.error = e
        finally:
            job.done.set()


_HELPERS = _Helpers()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_HELPERS.forget)
_SIDE_STREAMS: dict[torch.device, Any] = {}


def run_copies(plan: CopyPlan, srcs: list[torch.Tensor]) -> None:
    """Copies the sources (by position) into the plan's destinations; returns when done."""
    for device, (dsts, positions) in plan.cuda.items():
        stream = _SIDE_STREAMS.get(device)
        if stream is None:
            stream = _SIDE_STREAMS[device] = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream(device))  # what training queued on them
        with torch.cuda.stream(stream), torch.no_grad():
            for dst, pos in zip(dsts, positions, strict=True):  # device to pinned host, queued
                dst.copy_(srcs[pos], non_blocking=True)
    # a conjugate or negative view holds other bytes than its values: copied with copy_
    lazy = {pos for pos in plan.large if srcs[pos].is_conj() or srcs[pos].is_neg()}
    works = [
        (
            share.dsts,
            [srcs[p] for p in share.positions],
            [
                (dst, srcs[pos].data_ptr() + offset, n)
                for dst, pos, offset, n in share.ranges
                if pos not in lazy
            ],
        )
        for share in plan.shares
    ]
    if works:
        _HELPERS.run(works)
    with torch.no_grad():
        for dst_tensor, pos in [*plan.strided, *((d, p) for p in lazy for d in plan.large[p])]:
            dst_tensor.copy_(srcs[pos])
    for device in plan.cuda:
        _SIDE_STREAMS[device].synchronize()
