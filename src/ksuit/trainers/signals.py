"""Graceful stop on SIGTERM and SIGINT: the trainer finishes the current update, saves `latest`
and raises `TrainingInterrupted`. A second SIGINT aborts at once (KeyboardInterrupt)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from ksuit.utils.training import TrainingIteration

# what signal.signal returns and accepts: a function, SIG_DFL/SIG_IGN, or None (set outside Python)
_SignalHandler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving a resumable checkpoint.

    `signum` is the signal, `training_iteration` where training stopped, `checkpoint_tag` the
    tag that was saved (`latest`). `exit_code` is the conventional `128 + signum`.
    """

    def __init__(self, signum: int, training_iteration: TrainingIteration, checkpoint_tag: str, run_dir: str):
        self.signum = signum
        self.training_iteration = training_iteration
        self.checkpoint_tag = checkpoint_tag
        self.run_dir = run_dir
        super().__init__(
            f"training stopped by {self.signal_name} at {training_iteration}; "
            f"saved checkpoint '{checkpoint_tag}' in {run_dir}"
        )

    @property
    def signal_name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequest:
    """Installs SIGTERM/SIGINT handlers for its `with` block; `signum` is set once one arrives.

    Outside the main thread (where Python cannot install handlers) it installs nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, _SignalHandler] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl+C: do not wait for the save
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
