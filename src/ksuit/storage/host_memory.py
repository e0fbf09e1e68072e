"""Host memory for snapshots: segments that are mapped ahead of time and touched in the
background, so that the first asynchronous save copies into resident memory.

Fresh memory is several times slower to copy into than memory touched before (every 4 KiB page
faults and is zeroed by the kernel on first write: about 2 GB/s on the `make bench` machine,
against about 10 GB/s for a copy into touched memory). A `Segment` is one contiguous block: an
anonymous mapping (zero-filled by the kernel) or, for CUDA sources, a pinned tensor.

Preparation: a prepared segment is made resident chunk by chunk (`TOUCH_CHUNK`) by a background
thread (`touch_next`). A save that comes before that is done `claim`s the range it needs: it waits
only for a chunk being touched inside that range and faults in the rest of the range itself
while copying; the toucher never writes into a claimed range again (it writes zeros, which must
not land on copied bytes).
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable
from typing import cast

import torch
from typing_extensions import Buffer

PAGE = 4096
TOUCH_CHUNK = 64 << 20  # the toucher's step: the most a save waits for it


class Segment:
    """One contiguous block of host memory (see the module docstring)."""

    def __init__(self, nbytes: int, pinned: bool, prepared: bool = False):
        self.nbytes = nbytes
        self.pinned = pinned
        self.dirty_upto = 0  # bytes below this may hold data of an earlier layout
        self._tensor: torch.Tensor | None = None
        self._alloc_lock = threading.Lock()
        self._cond = threading.Condition()
        self._touched = 0 if prepared else nbytes  # resident bytes from the start
        self._claimed = 0
        self._busy: tuple[int, int] | None = None
        if not (prepared and pinned):  # pinned memory is slow to get: the toucher allocates it
            self._ensure()

    def _ensure(self) -> torch.Tensor:
        with self._alloc_lock:
            if self._tensor is None:
                if self.pinned:
                    self._tensor = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=True)
                    self.dirty_upto = self.nbytes  # not zeroed
                elif self.nbytes:
                    self._tensor = torch.frombuffer(mmap.mmap(-1, self.nbytes), dtype=torch.uint8)
                else:
                    self._tensor = torch.empty(0, dtype=torch.uint8)
            return self._tensor

    @property
    def tensor(self) -> torch.Tensor:
        """The memory as a flat uint8 tensor (allocated now if the toucher has not yet)."""
        return self._ensure()

    @property
    def touched(self) -> int:
        """Bytes from the start the toucher has made resident (all, for a segment not prepared)."""
        with self._cond:
            return self._touched

    @property
    def claimed(self) -> int:
        """Bytes from the start a save has taken over."""
        with self._cond:
            return self._claimed

    def touch_next(self, touch: Callable[[torch.Tensor], None]) -> bool:
        """Touches the next chunk nobody claimed; False when nothing is left (toucher side)."""
        tensor = self._ensure()
        with self._cond:
            start = max(self._touched, self._claimed)
            if start >= self.nbytes:
                return False
            end = min(start + TOUCH_CHUNK, self.nbytes)
            self._busy = (start, end)
        try:
            touch(tensor[start:end])
        finally:
            with self._cond:
                self._busy = None
                self._touched = end
                self._cond.notify_all()
        return True

    def claim(self, upto: int) -> None:
        """Makes `[0, upto)` the caller's: waits for a chunk being touched inside it, and the
        toucher keeps out of it from then on."""
        with self._cond:
            self._claimed = max(self._claimed, upto)
            self._cond.wait_for(lambda: self._busy is None or self._busy[0] >= upto)


def touch_pages(chunk: torch.Tensor) -> None:
    """Makes `chunk` resident: a zero into every page of mapped memory (zero already, so it stays
    so). Pinned memory is resident once allocated (the toucher allocates it): nothing to do."""
    if not chunk.is_pinned():
        chunk[::PAGE].zero_()


def exact_region(flat: torch.Tensor, nbytes: int, start: int = 0) -> torch.Tensor:
    """Bytes `start:start + nbytes` of `flat` as a tensor whose *storage* is exactly that long.

    `torch.save` writes a tensor's whole storage; a plain slice of a larger buffer would put the
    bytes of other files or earlier saves into the file. `frombuffer` shares the memory (no copy)
    and keeps `flat` alive.
    """
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(
        memoryview(cast(Buffer, flat.numpy())), dtype=torch.uint8, count=nbytes, offset=start
    )


class Toucher:
    """One background thread that touches prepared segments, oldest first."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: list[Segment] = []
        self._thread: threading.Thread | None = None
        self._stop = False

    def add(self, segments: list[Segment]) -> None:
        with self._cond:
            self._queue.extend(segments)
            if self._queue and self._thread is None and not self._stop:
                self._thread = threading.Thread(target=self._run, name="ksuit-snapshot-prepare", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stop or not self._queue:
                    self._thread = None
                    self._cond.notify_all()
                    return
                segment = self._queue[0]
            try:
                while not self._stop and segment.touch_next(touch_pages):
                    pass
            except Exception:  # no pinned memory now: the save allocates it (and reports)
                pass
            with self._cond:
                self._queue.remove(segment)

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until every queued segment is touched (or given up); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._thread is None, timeout=timeout)

    def stop(self) -> None:
        with self._cond:
            self._stop = True
        self.wait()
