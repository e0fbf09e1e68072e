"""Work beside the caller: a helper thread that falls back to running inline."""

from __future__ import annotations

import threading
from collections.abc import Callable


def in_background(work: Callable[[], None], name: str) -> Callable[[], None]:
    """Starts `work` in a daemon thread and returns the function that waits for it. Where no
    thread can be started (interpreter shutdown) `work` runs when that function is called, so
    the caller's order of events stays the same. `work` must keep its own errors (a thread's
    exception would be lost)."""
    thread = threading.Thread(target=work, name=name, daemon=True)
    try:
        thread.start()
    except RuntimeError:  # can't create new thread at interpreter shutdown
        return work
    return thread.join
