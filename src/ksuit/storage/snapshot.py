"""Snapshots of payloads into reusable host buffers, for asynchronous saving.

A snapshot copies every tensor of a save into one flat host buffer per file (pinned when a
source is on CUDA) and rebuilds the containers around it, so training may change parameters and
optimizer state while the copy is being written. Buffers are kept and reused: memory touched once
is several times faster to copy into than fresh memory, and steady-state saving allocates nothing.

Layout of a file's buffer (`plan_layout`, the one place that decides it): the tensors of one dtype
share a region that is a storage of its own, because torch's file formats refuse one storage
viewed as two dtypes (a trainer state holds int64 and uint8 RNG tensors, a BatchNorm an int64
counter next to float weights). Inside a region every tensor starts 64-byte aligned; the padding
is zeroed, so a file never carries stale bytes of an earlier save.
"""

from __future__ import annotations

import copy
import ctypes
import threading
from collections import OrderedDict
from typing import Any, NamedTuple, cast

import torch
from typing_extensions import Buffer

ALIGNMENT = 64


def _is_plain_dense(t: torch.Tensor) -> bool:
    """Whether `t` is copied into the buffer (the rest is cloned or, without data, kept)."""
    return (
        t.layout == torch.strided
        and not t.is_quantized
        and not getattr(t, "is_nested", False)
        and t.device.type != "meta"
    )


TensorKey = tuple[Any, ...]
"""What identifies a tensor's bytes: device, storage, offset, shape, strides, dtype."""


def _tensor_key(t: torch.Tensor) -> TensorKey:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def collect_tensors(payload: Any) -> tuple[list[torch.Tensor], list[TensorKey], dict[int, int]]:
    """The distinct dense, non-empty tensors with data of a payload in visit order, their keys,
    and `{id(tensor object): position}` for each of those tensor objects (aliases share a position)."""
    tensors: list[torch.Tensor] = []
    keys: list[TensorKey] = []
    position: dict[TensorKey, int] = {}
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


class Layout(NamedTuple):
    """Where the tensors of one file go in its flat buffer (see the module docstring)."""

    regions: list[tuple[int, int]]  # (start, nbytes) in the buffer: one storage per dtype
    places: list[tuple[int, int, int]]  # per tensor: (region index, offset in the region, nbytes)
    total: int  # bytes of the buffer the layout uses


def plan_layout(tensors: list[torch.Tensor]) -> Layout:
    """The layout of `tensors` (distinct, dense, non-empty) in one file's buffer: one region per
    dtype, in order of first appearance, every tensor and region 64-byte aligned."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    places: list[tuple[int, int, int]] = [(0, 0, 0)] * len(tensors)
    regions: list[tuple[int, int]] = []
    start = 0
    for members in by_dtype.values():
        end = 0
        for i in members:
            offset = _align(end)
            nbytes = tensors[i].numel() * tensors[i].element_size()
            places[i] = (len(regions), offset, nbytes)
            end = offset + nbytes
        regions.append((start, end))  # no trailing padding: the storage ends with its last tensor
        start += _align(end)
    return Layout(regions, places, start)


class SnapshotBuffer:
    """Flat uint8 host buffers, one per file of a save, grown when needed and otherwise reused.

    Each file gets its own buffer because `torch.save` writes a tensor's whole storage: views
    into one buffer shared by several files would put every file's bytes into each file. The
    views of the last layout per file are cached: a save with the same tensors (the steady state
    of training, where parameters and optimizer state change in place) creates no new tensors.
    """

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []
        self._layouts: dict[int, tuple[list[TensorKey], torch.Tensor, list[torch.Tensor]]] = {}

    def ensure(self, index: int, nbytes: int, pinned: bool) -> torch.Tensor:
        while len(self.buffers) <= index:
            self.buffers.append(torch.empty(0, dtype=torch.uint8))
        pin = pinned and torch.cuda.is_available()
        if self.buffers[index].numel() < nbytes or (pin and not self.buffers[index].is_pinned()):
            self.buffers[index] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        return self.buffers[index]

    def views(self, index: int, tensors: list[torch.Tensor], keys: list[TensorKey]) -> list[torch.Tensor]:
        """Destination views, one per tensor, laid out by `plan_layout` in buffer `index`."""
        cached = self._layouts.get(index)
        if cached is not None and cached[0] == keys and cached[1] is self.buffers[index]:
            return cached[2]
        layout = plan_layout(tensors)
        any_cuda = any(t.device.type == "cuda" for t in tensors)
        flat = self.ensure(index, layout.total, pinned=any_cuda)
        regions = [exact_region(flat, nbytes, start) for start, nbytes in layout.regions]
        views = []
        for t, (region_index, offset, nbytes) in zip(tensors, layout.places, strict=True):
            region, end = regions[region_index], offset + nbytes
            views.append(region[offset:end].view(t.dtype).view(t.shape))
            if _align(end) > end:
                region[end : _align(end)].zero_()  # padding up to the next tensor (none after the last)
        self._layouts[index] = (keys, flat, views)
        return views

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self.buffers)


def exact_region(flat: torch.Tensor, nbytes: int, start: int = 0) -> torch.Tensor:
    """Bytes `start:start + nbytes` of `flat` as a tensor whose *storage* is exactly that long.

    `torch.save` writes a tensor's whole storage; a plain slice of a reused, larger buffer would
    put stale bytes of earlier saves into the file. `frombuffer` shares the memory (no copy) and
    keeps `flat` alive.
    """
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(
        memoryview(cast(Buffer, flat.numpy())), dtype=torch.uint8, count=nbytes, offset=start
    )


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

    Aliases (the same tensor object reached twice, or two views with the same storage, offset,
    shape, strides and dtype) stay aliases in the copy. Parameters stay parameters and
    `requires_grad` is kept, as a synchronous save keeps them. Sparse, quantized and nested
    tensors are cloned; meta tensors (no data) are kept as they are.
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
        results.append(_rebuild(payload, views, by_id, {}))
    return results


_IMMUTABLE = (str, int, float, bool, type(None), bytes, torch.Size, torch.dtype, torch.device)


def _tensor_copy(obj: torch.Tensor, views: list[torch.Tensor], by_id: dict[int, int]) -> torch.Tensor:
    pos = by_id.get(id(obj))
    if pos is not None:
        out = views[pos]
    elif obj.device.type == "meta":
        out = obj.detach()
    elif obj.numel() == 0:
        out = torch.empty(obj.shape, dtype=obj.dtype)
    else:
        out = obj.detach().cpu().clone()
    if isinstance(obj, torch.nn.Parameter):
        return torch.nn.Parameter(out, requires_grad=obj.requires_grad)
    if obj.requires_grad:
        return out.detach().requires_grad_(True)  # a new alias: the cached view stays as it is
    return out


def _rebuild(obj: Any, views: list[torch.Tensor], by_id: dict[int, int], memo: dict[int, Any]) -> Any:
    if isinstance(obj, torch.Tensor):
        out = memo.get(id(obj))
        if out is None:  # the same object twice in a payload is one object in the copy, as in a file
            out = memo[id(obj)] = _tensor_copy(obj, views, by_id)
        return out
    cls = type(obj)
    if cls is dict:
        return {k: _rebuild(v, views, by_id, memo) for k, v in obj.items()}
    if cls is OrderedDict:
        return OrderedDict((k, _rebuild(v, views, by_id, memo)) for k, v in obj.items())
    if cls is list:
        return [_rebuild(v, views, by_id, memo) for v in obj]
    if cls is tuple:
        return tuple(_rebuild(v, views, by_id, memo) for v in obj)
    if isinstance(obj, _IMMUTABLE):
        return obj
    return copy.deepcopy(obj)


class SnapshotPool:
    """`max_pending` reusable buffers; `acquire()` blocks while all are in flight (backpressure)."""

    def __init__(self, max_pending: int):
        if not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be an int >= 1, got {max_pending!r}")
        self._all = tuple(SnapshotBuffer() for _ in range(max_pending))
        self._free = list(self._all)
        self._cond = threading.Condition()

    @property
    def buffers(self) -> tuple[SnapshotBuffer, ...]:
        """Every buffer of the pool, free or in flight (their `nbytes` is the host memory held)."""
        return self._all

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

    @property
    def free_count(self) -> int:
        """Buffers not in flight now: `max_pending` minus the snapshots being written or queued."""
        with self._cond:
            return len(self._free)
