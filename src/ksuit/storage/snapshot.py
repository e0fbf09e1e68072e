"""Snapshots of payloads into reusable host buffers, for asynchronous saving.

A snapshot copies every tensor of a save into one flat host buffer (pinned when a source is on
CUDA) and rebuilds the containers around it, so training may change parameters and optimizer
state while the copy is being written. Buffers are kept and reused: memory touched once is
several times faster to copy into than fresh memory, and steady-state saving allocates nothing.
"""

from __future__ import annotations

import copy
import ctypes
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


def collect_tensors(payload: Any) -> tuple[list[torch.Tensor], list[tuple], dict[int, int]]:
    """The distinct dense, non-empty tensors of a payload in visit order, their keys, and
    `{id(tensor object): position}` for every tensor object (aliases share a position)."""
    tensors: list[torch.Tensor] = []
    keys: list[tuple] = []
    position: dict[tuple, int] = {}
    by_id: dict[int, int] = {}

    def visit(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.numel() == 0 or not _is_plain_dense(obj):
                return
            key = _tensor_key(obj)
            pos = position.get(key)
            if pos is None:
                pos = position[key] = len(tensors)
                tensors.append(obj)
                keys.append(key)
            by_id[id(obj)] = pos
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v)

    visit(payload)
    return tensors, keys, by_id


class SnapshotBuffer:
    """Flat uint8 host buffers, one per file of a save, grown when needed and otherwise reused.

    Each file gets its own buffer because `torch.save` writes a tensor's whole storage: views
    into one buffer shared by several files would put every file's bytes into each file. The
    views of the last layout per file are cached: a save with the same tensors (the steady state
    of training, where parameters and optimizer state change in place) creates no new tensors.
    """

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []
        self.pinned = False
        self._layouts: dict[int, tuple[list[tuple], torch.Tensor, list[torch.Tensor]]] = {}

    def ensure(self, index: int, nbytes: int, pinned: bool) -> torch.Tensor:
        while len(self.buffers) <= index:
            self.buffers.append(torch.empty(0, dtype=torch.uint8))
        pin = pinned and torch.cuda.is_available()
        if self.buffers[index].numel() < nbytes or (pin and not self.buffers[index].is_pinned()):
            self.buffers[index] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        return self.buffers[index]

    def views(self, index: int, tensors: list[torch.Tensor], keys: list[tuple]) -> list[torch.Tensor]:
        """Destination views, one per tensor, packed 64-byte aligned into buffer `index`."""
        cached = self._layouts.get(index)
        if cached is not None and cached[0] == keys and cached[1] is self.buffers[index]:
            return cached[2]
        offsets = []
        total = 0
        for t in tensors:
            offsets.append(total)
            total += _align(t.numel() * t.element_size())
        any_cuda = any(t.device.type == "cuda" for t in tensors)
        flat = self.ensure(index, total, pinned=any_cuda)
        region = exact_region(flat, total)
        views = [
            region[off : off + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
            for t, off in zip(tensors, offsets, strict=True)
        ]
        self._layouts[index] = (keys, flat, views)
        return views

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


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """`dst.copy_(src)`; a plain single-threaded memmove for contiguous CPU tensors.

    torch's parallel copy spreads small copies over intra-op threads, which on a machine whose
    cores are busy (training, data loading) was several times slower than one memmove.
    """
    if src.device.type == "cpu" and src.is_contiguous() and not src.is_conj() and not src.is_neg():
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), src.numel() * src.element_size())
    else:
        dst.copy_(src.detach(), non_blocking=src.device.type == "cuda")


def take_snapshot(payloads: list[Any], buffer: SnapshotBuffer) -> list[Any]:
    """Copies of `payloads` whose tensors live in `buffer`; containers are rebuilt.

    Aliases (the same tensor reached twice, or two views with the same storage, offset, shape
    and strides) stay aliases in the copy. Sparse, quantized and nested tensors are cloned.
    """
    any_cuda = False
    results = []
    plans = []
    for index, payload in enumerate(payloads):
        tensors, keys, by_id = collect_tensors(payload)
        views = buffer.views(index, tensors, keys)
        for src, dst in zip(tensors, views, strict=True):
            any_cuda = any_cuda or src.device.type == "cuda"
            copy_into(dst, src)
        plans.append((views, by_id))
    if any_cuda:
        torch.cuda.synchronize()
    for payload, (views, by_id) in zip(payloads, plans, strict=True):
        results.append(_rebuild(payload, views, by_id))
    return results


_IMMUTABLE = (str, int, float, bool, type(None), bytes, torch.Size, torch.dtype, torch.device)


def _rebuild(obj: Any, views: list[torch.Tensor], by_id: dict[int, int]) -> Any:
    if isinstance(obj, torch.Tensor):
        pos = by_id.get(id(obj))
        if pos is not None:
            return views[pos]
        if obj.numel() == 0:
            return torch.empty(obj.shape, dtype=obj.dtype)
        return obj.detach().cpu().clone()
    cls = type(obj)
    if cls is dict:
        return {k: _rebuild(v, views, by_id) for k, v in obj.items()}
    if cls is OrderedDict:
        return OrderedDict((k, _rebuild(v, views, by_id)) for k, v in obj.items())
    if cls is list:
        return [_rebuild(v, views, by_id) for v in obj]
    if cls is tuple:
        return tuple(_rebuild(v, views, by_id) for v in obj)
    if isinstance(obj, _IMMUTABLE):
        return obj
    return copy.deepcopy(obj)


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
