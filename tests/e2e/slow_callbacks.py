"""A callback that slows training down, so a test can signal a run while it is still training.
It keeps no state, so it changes nothing a resume restores (imported by the e2e configs via PYTHONPATH)."""

import time

from ksuit.callbacks import Callback


class Sleep(Callback):
    def __init__(self, seconds: float = 0.05, name: str | None = None):
        super().__init__(name=name or "sleep")
        self.seconds = seconds

    def after_update(self, trainer) -> None:
        time.sleep(self.seconds)
