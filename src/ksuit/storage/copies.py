"""Copying a snapshot's tensors with every core and without Python work per small tensor.

- Small tensors (under `LARGE_COPY_BYTES`): `torch._foreach_copy_` over lists, one call per
  thread, the lists split by bytes over `torch.get_num_threads()` threads (the caller's and
  helper threads; torch releases the GIL inside its ops). One thread alone copies a list of small
  tensors at about half the speed of a parallel copy of the same bytes on the `make bench`
  machine; Python `copy_` per tensor adds a microsecond or more each.
- Large tensors: `copy_`, which spreads one tensor over torch's intra-op threads.
- CUDA sources: `_foreach_copy_(non_blocking=True)` on a side stream that first waits for the
  current stream, into pinned memory, then the side stream is synchronized.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, NamedTuple

import torch

LARGE_COPY_BYTES = 4 << 20
MIN_SPLIT_BYTES = 1 << 20  # fewer small bytes than this are copied by the caller alone


class CopyPlan(NamedTuple):
    """The copies of one snapshot; positions index the sources passed to `run_copies`."""

    shares: list[tuple[list[torch.Tensor], list[int]]]  # small tensors: one list per thread
    large: list[tuple[torch.Tensor, int]]
    cuda: dict[torch.device, tuple[list[torch.Tensor], list[int]]]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def plan_copies(dsts: list[tuple[torch.Tensor, int]], devices: list[torch.device], threads: int) -> CopyPlan:
    """Sorts `(destination, source position)` pairs (in memory order) into the kinds of copy and
    splits the small ones into at most `threads` lists of about equal bytes."""
    small: list[tuple[torch.Tensor, int]] = []
    large: list[tuple[torch.Tensor, int]] = []
    cuda: dict[torch.device, tuple[list[torch.Tensor], list[int]]] = {}
    for dst, pos in dsts:
        if devices[pos].type == "cuda":
            entry = cuda.setdefault(devices[pos], ([], []))
            entry[0].append(dst)
            entry[1].append(pos)
        elif _nbytes(dst) >= LARGE_COPY_BYTES:
            large.append((dst, pos))
        else:
            small.append((dst, pos))
    total = sum(_nbytes(d) for d, _ in small)
    n = max(1, min(threads, total // MIN_SPLIT_BYTES, len(small)))
    shares: list[tuple[list[torch.Tensor], list[int]]] = []
    filled = 0
    for dst, pos in small:
        if not shares or (len(shares) < n and filled >= total * len(shares) / n):
            shares.append(([], []))
        shares[-1][0].append(dst)
        shares[-1][1].append(pos)
        filled += _nbytes(dst)
    return CopyPlan(shares, large, cuda)


def _copy_list(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    with torch.no_grad():  # grad mode is per thread; sources may require grad
        torch._foreach_copy_(dsts, srcs)


class _Job:
    def __init__(self, dsts: list[torch.Tensor], srcs: list[torch.Tensor]):
        self.dsts, self.srcs = dsts, srcs
        self.done = threading.Event()
        self.error: BaseException | None = None


class _Helpers:
    """Threads that copy lists while the caller copies its own. Where no thread can be started
    (interpreter shutdown) the caller copies every list."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: list[queue.SimpleQueue[_Job]] = []

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

    def run(self, lists: list[tuple[list[torch.Tensor], list[torch.Tensor]]]) -> None:
        helpers = min(self._ensure(len(lists) - 1), len(lists) - 1) if len(lists) > 1 else 0
        jobs = [_Job(*pair) for pair in lists[1 : helpers + 1]]
        for q, job in zip(self._queues, jobs, strict=False):
            q.put(job)
        try:
            for dsts, srcs in [lists[0], *lists[helpers + 1 :]]:
                _copy_list(dsts, srcs)
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
            _copy_list(job.dsts, job.srcs)
        except BaseException as e:  # re-raised on the caller's thread
            job.error = e
        finally:
            job.done.set()


_HELPERS = _Helpers()
_SIDE_STREAMS: dict[torch.device, Any] = {}


def run_copies(plan: CopyPlan, srcs: list[torch.Tensor]) -> None:
    """Copies the sources (by position) into the plan's destinations; returns when done."""
    for device, (dsts, positions) in plan.cuda.items():
        stream = _SIDE_STREAMS.get(device)
        if stream is None:
            stream = _SIDE_STREAMS[device] = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream(device))  # what training queued on them
        with torch.cuda.stream(stream), torch.no_grad():
            torch._foreach_copy_(dsts, [srcs[p] for p in positions], non_blocking=True)
    if plan.shares:
        _HELPERS.run([(dsts, [srcs[p] for p in positions]) for dsts, positions in plan.shares])
    if plan.large:
        with torch.no_grad():
            for dst, pos in plan.large:
                dst.copy_(srcs[pos])
    for device in plan.cuda:
        _SIDE_STREAMS[device].synchronize()
