"""Snapshots of payloads into reusable host buffers, for asynchronous saving.

A snapshot copies every tensor of a save into one flat host buffer (pinned when a source is on
CUDA) and rebuilds the containers around it, so training may change parameters and optimizer
state while the copy is being written. Buffers are kept and reused: memory touched once is
several times faster to copy into than fresh memory, and steady-state saving allocates nothing.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from typing import Any

import torch

ALIGNMENT = 64


def _is_plain_dense(t: torch.Tensor) -> bool:
    return t.layout == torch.strided and not t.is_quantized and not getattr(t, "is_nested", False)


def _tensor_key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def plan_snapshot(payload: Any) -> tuple[dict[tuple, tuple[torch.Tensor, int]], int, bool]:
    """Offsets of every distinct dense tensor of one payload in one flat buffer;
    returns `(layout, total bytes, any cuda)`."""
    layout: dict[tuple, tuple[torch.Tensor, int]] = {}
    offset = 0
    any_cuda = False

    def visit(obj: Any) -> None:
        nonlocal offset, any_cuda
        if isinstance(obj, torch.Tensor):
            if not _is_plain_dense(obj) or obj.numel() == 0:
                return
            key = _tensor_key(obj)
            if key not in layout:
                layout[key] = (obj, offset)
                offset += _align(obj.numel() * obj.element_size())
                any_cuda = any_cuda or obj.device.type == "cuda"
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v)

    visit(payload)
    return layout, offset, any_cuda


class SnapshotBuffer:
    """Flat uint8 host buffers, one per file of a save, grown when needed and otherwise reused.

    Each file gets its own buffer because `torch.save` writes a tensor's whole storage: views
    into one buffer shared by several files would put every file's bytes into each file.
    """

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []
        self.pinned = False

    def ensure(self, index: int, nbytes: int, pinned: bool) -> torch.Tensor:
        while len(self.buffers) <= index:
            self.buffers.append(torch.empty(0, dtype=torch.uint8))
        pin = pinned and torch.cuda.is_available()
        if self.buffers[index].numel() < nbytes or (pin and not self.buffers[index].is_pinned()):
            self.buffers[index] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        return self.buffers[index]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self.buffers)


def exact_region(flat: torch.Tensor, nbytes: int) -> torch.Tensor:
    """The first `nbytes` of `flat` as a tensor whose *storage* is exactly that long.

    `torch.save` writes a tensor's whole storage; a plain slice of a reused, larger buffer would
    put stale bytes of earlier saves into the file. `frombuffer` shares the memory (no copy) and
    keeps `flat` alive.
    """
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(memoryview(flat.numpy()), dtype=torch.uint8, count=nbytes)


def take_snapshot(payloads: list[Any], buffer: SnapshotBuffer) -> list[Any]:
    """Copies of `payloads` whose tensors live in `buffer`; containers are rebuilt."""
    copies: dict[tuple, torch.Tensor] = {}
    any_cuda = False
    for index, payload in enumerate(payloads):
        layout, total, cuda = plan_snapshot(payload)
        any_cuda = any_cuda or cuda
        flat = exact_region(buffer.ensure(index, total, pinned=cuda), total)
        for key, (src, offset) in layout.items():
            nbytes = src.numel() * src.element_size()
            dst = flat[offset : offset + nbytes].view(src.dtype).view(src.shape)
            dst.copy_(src.detach(), non_blocking=src.device.type == "cuda")
            copies[(index, *key)] = dst
    if any_cuda:
        torch.cuda.synchronize()

    def rebuild(obj: Any, index: int) -> Any:
        if isinstance(obj, torch.Tensor):
            if obj.numel() == 0:
                return torch.empty(obj.shape, dtype=obj.dtype)
            if not _is_plain_dense(obj):
                return obj.detach().cpu().clone()
            return copies[(index, *_tensor_key(obj))]
        if isinstance(obj, OrderedDict):
            return OrderedDict((k, rebuild(v, index)) for k, v in obj.items())
        if type(obj) is dict:
            return {k: rebuild(v, index) for k, v in obj.items()}
        if type(obj) is list:
            return [rebuild(v, index) for v in obj]
        if type(obj) is tuple:
            return tuple(rebuild(v, index) for v in obj)
        if isinstance(obj, (str, int, float, bool, type(None), bytes, torch.Size, torch.dtype, torch.device)):
            return obj
        return copy.deepcopy(obj)

    return [rebuild(p, i) for i, p in enumerate(payloads)]


class SnapshotPool:
    """`max_pending` reusable buffers; `acquire()` blocks while all are in flight (backpressure)."""

    def __init__(self, max_pending: int):
        if not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be an int >= 1, got {max_pending!r}")
        self._free = [SnapshotBuffer() for _ in range(max_pending)]
        self._cond = threading.Condition()

    def acquire(self, timeout: float | None = None) -> SnapshotBuffer:
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._free), timeout=timeout):
                raise TimeoutError("no snapshot buffer became free")
            # the largest free buffer is the most likely to fit without growing
            self._free.sort(key=lambda b: b.nbytes)
            return self._free.pop()

    def release(self, buffer: SnapshotBuffer) -> None:
        with self._cond:
            self._free.append(buffer)
            self._cond.notify()
