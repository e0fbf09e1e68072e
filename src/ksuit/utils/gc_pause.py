"""Cyclic garbage collection paused while ksuit takes or writes a checkpoint, from any thread.

Taking a state dict and pickling it create tens of thousands of objects that live while the save
runs (a detached tensor per parameter, torch.save's memo and storage keys per tensor). With
collection on, they set off collections that find them alive and promote them, and every few
saves a full collection (0.15 to 0.25 s on the `make bench` machine with 5,000 parameters) that
holds the GIL: the training thread stalls, whichever thread started it. Reference counting frees
these objects anyway (they form no cycles), so collection waits until no save is inside a pause:
an asynchronous save holds one from the moment it is queued until it is written, so the
collection that follows finds its objects freed.

The pause is process-wide (`gc.disable`) and counted: pauses of several threads nest, and the
collector is enabled again when the last one ends, if it was enabled when the first began.
Where pauses follow each other without a gap for `MAX_PAUSE_SECONDS` (back-to-back asynchronous
saves), the end of one runs a collection, so cyclic garbage never piles up.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
from collections.abc import Iterator

MAX_PAUSE_SECONDS = 60.0

_lock = threading.Lock()
_depth = 0
_was_enabled = False
_since = 0.0


def hold() -> None:
    """Begins a pause; every `hold` needs one `release`, from any thread."""
    global _depth, _was_enabled, _since
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            _since = time.monotonic()
            gc.disable()
        _depth += 1


def release() -> None:
    """Ends a pause begun with `hold`."""
    global _depth, _since
    collect = False
    with _lock:
        _depth -= 1
        if _depth == 0:
            if _was_enabled:
                gc.enable()
        elif _was_enabled and time.monotonic() - _since > MAX_PAUSE_SECONDS:
            collect, _since = True, time.monotonic()
    if collect:
        gc.collect()


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while the block runs (see the module docstring)."""
    hold()
    try:
        yield
    finally:
        release()


def _forget_in_child() -> None:
    """A forked child (a data-loader worker) has none of the parent's saves in flight."""
    global _depth, _lock
    _lock = threading.Lock()
    if _depth:
        _depth = 0
        if _was_enabled:
            gc.enable()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
