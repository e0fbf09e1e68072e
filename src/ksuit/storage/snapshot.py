"""Snapshots of payloads into reusable host memory, for asynchronous saving.

A snapshot copies every tensor of a save into host memory that the snapshot owns (pinned when a
source is on CUDA) and rebuilds the containers around it, so training may change parameters and
optimizer state while the copy is being written. The memory is kept and reused (memory touched
once is several times faster to copy into than fresh memory), and can be prepared before the
first save (`SnapshotPool.prepare`, `ksuit.storage.host_memory`).

Layout (`plan_layout`, the one place that decides it): the tensors of one dtype in one file
share a *region* that is a storage of its own, because `torch.save` writes a tensor's whole
storage and refuses one storage viewed as two dtypes (a trainer state holds int64 and uint8 RNG
tensors, a BatchNorm an int64 counter next to float weights). So small tensors are packed into
one buffer. Inside a region every tensor starts 64-byte aligned and the padding is zero, so a
file never carries stale bytes of an earlier save. Files with the same tensors of a dtype in the
same order (the weights of a progress tag and of `latest` in one save) share one region: those
bytes are copied and held once.

Steady state: a save whose tensors are those of the previous save on the same buffer (training
changes parameters and optimizer state in place) walks the payloads once, checks each tensor
against the cached plan (address, type, dtype, shape, strides, device, `requires_grad`) and
reuses the cached output tensors and copy lists: nothing is planned or allocated. Copying is
`ksuit.storage.copies` (every core, no Python per small tensor).
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, NamedTuple, cast

import torch

from ksuit.storage.copies import CopyPlan, plan_copies, run_copies
from ksuit.storage.host_memory import Segment, Toucher, exact_region

ALIGNMENT = 64


def _is_plain_dense(t: torch.Tensor) -> bool:
    """Whether `t` is copied into the snapshot memory (the rest is cloned or, without data, kept)."""
    return (
        t.layout == torch.strided
        and not t.is_quantized
        and not getattr(t, "is_nested", False)
        and t.device.type != "meta"
    )


TensorKey = tuple[Any, ...]
"""`(address of the first element, type, dtype, shape, strides, device, requires_grad)`."""


def _tensor_key(t: torch.Tensor) -> TensorKey:
    # data_ptr() first: it raises for sparse tensors, which then take the planning path
    return (t.data_ptr(), type(t), t.dtype, t.shape, t.stride(), t.device, t.requires_grad)


def _bytes_key(key: TensorKey) -> TensorKey:
    """The part of a key that says which bytes (views with the same key hold the same bytes)."""
    return (key[0], key[2], key[3], key[4], key[5])


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


# ---- layout -----------------------------------------------------------------------------------


class Region(NamedTuple):
    """The bytes of one storage: `members` are `(position, offset in the region, nbytes)`."""

    nbytes: int  # up to the end of its last tensor (no trailing padding)
    members: tuple[tuple[int, int, int], ...]


class Layout(NamedTuple):
    """Where the tensors of a save go (see the module docstring)."""

    regions: list[Region]
    places: list[dict[int, tuple[int, int]]]  # per file: position -> (region index, offset)
    total: int  # bytes of all regions, each rounded up to 64


def plan_layout(nbytes: list[int], dtypes: list[torch.dtype], files: list[list[int]]) -> Layout:
    """The layout of a save. `nbytes[p]`, `dtypes[p]`: the distinct tensors by position;
    `files[f]`: the positions of file `f` in visit order. One region per dtype per file, in order
    of first appearance, every tensor 64-byte aligned; files with the same positions of a dtype
    in the same order share the region."""
    regions: list[Region] = []
    shared: dict[tuple[int, ...], int] = {}
    places: list[dict[int, tuple[int, int]]] = []
    for positions in files:
        by_dtype: dict[torch.dtype, list[int]] = {}
        for p in positions:
            by_dtype.setdefault(dtypes[p], []).append(p)
        place: dict[int, tuple[int, int]] = {}
        for members in by_dtype.values():
            index = shared.get(tuple(members))
            if index is None:
                index = shared[tuple(members)] = len(regions)
                end, laid = 0, []
                for p in members:
                    offset = _align(end)
                    laid.append((p, offset, nbytes[p]))
                    end = offset + nbytes[p]
                regions.append(Region(end, tuple(laid)))
            for p, offset, _ in regions[index].members:
                place[p] = (index, offset)
        places.append(place)
    return Layout(regions, places, sum(_align(r.nbytes) for r in regions))


def first_fit(layout: Layout, sizes: list[int]) -> list[tuple[int, int] | None]:
    """`(segment, offset)` of each region in the first of the segments (of `sizes` bytes) where
    it fits after the regions placed there before it; None for a region that fits nowhere."""
    cursors = [0] * len(sizes)
    placed: list[tuple[int, int] | None] = []
    for region in layout.regions:
        size = _align(region.nbytes)
        for si, capacity in enumerate(sizes):
            if cursors[si] + size <= capacity:
                placed.append((si, cursors[si]))
                cursors[si] += size
                break
        else:
            placed.append(None)
    return placed


# ---- the snapshot -----------------------------------------------------------------------------


class _Plan(NamedTuple):
    """What a save with the same tensors reuses (see the module docstring)."""

    keys: list[TensorKey | None]  # per tensor met, in walk order; None: not copied
    outs: list[torch.Tensor | None]  # its output, a view of the memory
    positions: list[int]  # its source position (-1 when not copied)
    sources: int  # distinct positions
    copies: CopyPlan
    claims: list[tuple[Segment, int]]  # segments and how far this plan uses each


class _Mismatch(Exception):
    """The payloads differ from the cached plan."""


class SnapshotBuffer:
    """The host memory of one snapshot in flight, and the plan of its last save.

    Memory is a list of `Segment`s: a prepared one, then what a larger save needed on top. A save
    with new tensors plans again into the same memory and grows it only when it does not fit:
    prepared memory that falls short gets a segment for the rest; memory an earlier save used is
    replaced by one segment of the new size, so a buffer holds at most its largest save (or what
    was prepared, if that is more).
    """

    def __init__(self) -> None:
        self.segments: list[Segment] = []
        self.plans_made = 0  # saves that planned a layout (the others reused one)
        self._plan: _Plan | None = None

    @property
    def buffers(self) -> list[torch.Tensor]:
        """The memory of each segment (its `data_ptr` stays while the memory is reused)."""
        return [s.tensor for s in self.segments]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.segments)

    def add_prepared(self, nbytes: int, pinned: bool) -> Segment | None:
        """A segment for the background toucher that brings this buffer to `nbytes`, if needed."""
        if self.nbytes >= nbytes:
            return None
        segment = Segment(nbytes - self.nbytes, pinned, prepared=True)
        self.segments.append(segment)
        return segment

    def snapshot(self, payloads: list[Any]) -> list[Any]:
        """See `take_snapshot`."""
        results: list[Any] | None = None
        plan = self._plan
        if plan is not None:
            try:
                results, srcs = _walk(payloads, plan)
            except _Mismatch:
                results = None
        if results is None:
            self._plan = None  # its views point into memory the new plan reuses
            plan = self._plan = self._make_plan(payloads)
            results, srcs = _walk(payloads, plan)
        assert plan is not None
        for segment, end in plan.claims:
            segment.claim(end)
        run_copies(plan.copies, srcs)
        return results

    def _make_plan(self, payloads: list[Any]) -> _Plan:
        """Collects the tensors, lays them out, places the regions, builds views and copy lists."""
        keys: list[TensorKey | None] = []
        met_pos: list[int] = []
        met_file: list[int] = []
        first: list[torch.Tensor] = []
        by_bytes: dict[TensorKey, int] = {}
        files: list[list[int]] = []
        for f, payload in enumerate(payloads):
            in_file: dict[int, None] = {}
            for t in _tensors(payload):
                key = _tensor_key(t) if t.numel() and _is_plain_dense(t) else None
                pos = -1
                if key is not None:
                    pos = by_bytes.setdefault(_bytes_key(key), len(first))
                    if pos == len(first):
                        first.append(t)
                    in_file[pos] = None
                keys.append(key)
                met_pos.append(pos)
                met_file.append(f)
            files.append(list(in_file))
        sizes = [t.numel() * t.element_size() for t in first]
        layout = plan_layout(sizes, [t.dtype for t in first], files)
        devices = [t.device for t in first]
        pinned = torch.cuda.is_available() and any(d.type == "cuda" for d in devices)
        memory, claims = self._place(layout, pinned)
        storages = [exact_region(m, r.nbytes) for m, r in zip(memory, layout.regions, strict=True)]
        views: dict[tuple[int, int], torch.Tensor] = {}

        def view(pos: int, region: int, offset: int) -> torch.Tensor:
            v = views.get((region, pos))
            if v is None:
                t = first[pos]
                raw = storages[region][offset : offset + sizes[pos]]
                v = views[(region, pos)] = raw.view(t.dtype).view(t.shape)
            return v

        outs: list[torch.Tensor | None] = [
            None if pos < 0 else view(pos, *layout.places[f][pos])
            for pos, f in zip(met_pos, met_file, strict=True)
        ]
        dsts = [
            (view(pos, r, offset), pos)
            for r, region in enumerate(layout.regions)
            for pos, offset, _ in region.members
        ]
        copies = plan_copies(dsts, first, torch.get_num_threads())
        self.plans_made += 1
        return _Plan(keys, outs, met_pos, len(first), copies, claims)

    def _place(self, layout: Layout, pinned: bool) -> tuple[list[torch.Tensor], list[tuple[Segment, int]]]:
        """Each region's memory (growing the memory as the class docstring says), with the
        padding zeroed where an earlier layout left data; and how far each segment is used."""
        usable = [s for s in self.segments if s.pinned or not pinned]
        placed = first_fit(layout, [s.nbytes for s in usable])
        if None in placed and usable and self.plans_made == 0:
            rest = sum(_align(r.nbytes) for r, p in zip(layout.regions, placed, strict=True) if p is None)
            self.segments.append(Segment(rest, pinned))
            usable = [s for s in self.segments if s.pinned or not pinned]
            placed = first_fit(layout, [s.nbytes for s in usable])
        if None in placed:
            for dropped in self.segments:
                dropped.claim(dropped.nbytes)  # a toucher still at it stops
            self.segments = usable = [Segment(layout.total, pinned)]
            placed = first_fit(layout, [layout.total])
        where = cast(list[tuple[int, int]], placed)
        used: dict[int, int] = {}
        for region, (si, offset) in zip(layout.regions, where, strict=True):
            used[si] = max(used.get(si, 0), offset + _align(region.nbytes))
        claims = [(usable[si], end) for si, end in used.items()]
        for segment, end in claims:
            segment.claim(end)  # the toucher keeps out; a chunk it is touching there ends first
        memory = []
        for region, (si, offset) in zip(layout.regions, where, strict=True):
            segment = usable[si]
            base = segment.tensor[offset : offset + region.nbytes]
            if offset < segment.dirty_upto:
                _zero_padding(base, region)
            memory.append(base)
        for segment, end in claims:
            segment.dirty_upto = max(segment.dirty_upto, end)
        return memory, claims


def _zero_padding(base: torch.Tensor, region: Region) -> None:
    end = 0
    for _, offset, nbytes in region.members:
        if offset > end:
            base[end:offset].zero_()
        end = offset + nbytes


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """The tensors of a payload in the order `_walk` meets them (in the containers it rebuilds)."""
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    cls = type(obj)
    if cls is dict or cls is OrderedDict:
        for v in obj.values():
            yield from _tensors(v)
    elif cls is list or cls is tuple:
        for v in obj:
            yield from _tensors(v)


_IMMUTABLE = (str, int, float, bool, type(None), bytes, torch.Size, torch.dtype, torch.device)


def _walk(payloads: list[Any], plan: _Plan) -> tuple[list[Any], list[torch.Tensor]]:
    """Rebuilds the payloads with the plan's outputs in place of their tensors and collects the
    sources by position; raises `_Mismatch` at the first tensor the plan does not describe.

    The steady state's only Python work per tensor, so kept to a key, a comparison and a store.
    A plain tensor met twice gets its (shared) view both times; an object that is wrapped
    (Parameter, `requires_grad`) or cloned becomes one object in the copy, as in a file."""
    entries = iter(zip(plan.keys, plan.outs, plan.positions, strict=True))
    srcs: list[Any] = [None] * plan.sources
    memo: dict[int, Any] = {}
    Tensor = torch.Tensor

    def tensor(t: torch.Tensor) -> Any:
        want, out, pos = next(entries, _END)
        if want is None:
            if out is _END or t.numel() and _is_plain_dense(t):
                raise _Mismatch
            return _once(memo, t, lambda: _clone_other(t))
        try:
            key = (t.data_ptr(), type(t), t.dtype, t.shape, t.stride(), t.device, t.requires_grad)
        except RuntimeError:  # no data_ptr (sparse)
            raise _Mismatch from None
        if key != want:
            raise _Mismatch
        srcs[pos] = t
        if want[1] is not Tensor or want[6]:
            return _once(memo, t, lambda: _wrap(t, cast(torch.Tensor, out)))
        return out

    def rebuild(obj: Any) -> Any:
        cls = type(obj)
        if cls is Tensor or isinstance(obj, Tensor):
            return tensor(obj)
        if cls is dict:
            return {k: tensor(v) if type(v) is Tensor else rebuild(v) for k, v in obj.items()}
        if cls is OrderedDict:
            return OrderedDict([(k, tensor(v) if type(v) is Tensor else rebuild(v)) for k, v in obj.items()])
        if cls is list:
            return [rebuild(v) for v in obj]
        if cls is tuple:
            return tuple([rebuild(v) for v in obj])
        if isinstance(obj, _IMMUTABLE):
            return obj
        return copy.deepcopy(obj)

    results = [rebuild(p) for p in payloads]
    if next(entries, None) is not None:
        raise _Mismatch
    return results, srcs


def _once(memo: dict[int, Any], t: torch.Tensor, make: Any) -> Any:
    out = memo.get(id(t))
    if out is None:
        out = memo[id(t)] = make()
    return out


_END: tuple[None, Any, int] = (None, object(), -1)


def _clone_other(obj: torch.Tensor) -> torch.Tensor:
    """A tensor not copied into the memory: meta kept, empty recreated, the rest cloned."""
    if obj.device.type == "meta":
        out = obj.detach()
    elif obj.numel() == 0:
        out = torch.empty(obj.shape, dtype=obj.dtype)
    else:
        out = obj.detach().cpu().clone()
    return _wrap(obj, out)


def _wrap(obj: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Parameters stay parameters and `requires_grad` is kept, as a synchronous save keeps them."""
    if isinstance(obj, torch.nn.Parameter):
        return torch.nn.Parameter(out, requires_grad=obj.requires_grad)
    if obj.requires_grad:
        return out.detach().requires_grad_(True)  # a new alias: the cached view stays as it is
    return out


def take_snapshot(payloads: list[Any], buffer: SnapshotBuffer) -> list[Any]:
    """Copies of `payloads` whose tensors live in `buffer`'s memory; containers are rebuilt.

    Aliases (the same tensor object reached twice, or two views with the same storage, offset,
    shape, strides and dtype) stay aliases in the copy. Parameters stay parameters and
    `requires_grad` is kept, as a synchronous save keeps them. Sparse, quantized and nested
    tensors are cloned; meta tensors (no data) are kept as they are; containers other than dict,
    OrderedDict, list and tuple are deep-copied.
    """
    return buffer.snapshot(payloads)


class SnapshotPool:
    """`max_pending` reusable buffers; `acquire()` blocks while all are in flight (backpressure).

    `prepare(nbytes)` brings every buffer to `nbytes` of memory that one background thread
    touches, buffer by buffer, so the first saves copy into resident memory.
    """

    def __init__(self, max_pending: int):
        if not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be an int >= 1, got {max_pending!r}")
        self._all = tuple(SnapshotBuffer() for _ in range(max_pending))
        self._free = list(self._all)
        self._cond = threading.Condition()
        self._toucher = Toucher()

    @property
    def buffers(self) -> tuple[SnapshotBuffer, ...]:
        """Every buffer of the pool, free or in flight (their `nbytes` is the host memory held)."""
        return self._all

    def prepare(self, nbytes: int, pinned: bool = False) -> None:
        """Maps `nbytes` for each buffer that has less and touches it in the background; returns
        at once. Memory: `max_pending` x `nbytes`, what as many saves of `nbytes` take anyway.
        Call it from the thread that saves (it changes the buffers' memory)."""
        with self._cond:
            segments = [s for b in self._all if (s := b.add_prepared(nbytes, pinned)) is not None]
        self._toucher.add(segments)

    def wait_prepared(self, timeout: float | None = None) -> bool:
        """Blocks until the background touching has ended; False on timeout."""
        return self._toucher.wait(timeout)

    def close(self) -> None:
        """Stops the background touching (the memory goes with the pool)."""
        self._toucher.stop()

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
            self._cond.notify_all()

    @property
    def free_count(self) -> int:
        """Buffers not in flight now: `max_pending` minus the snapshots being written or queued."""
        with self._cond:
            return len(self._free)
