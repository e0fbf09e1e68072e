"""`ProgressBarCallback`: a rich progress bar of the updates, for interactive terminals."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, ClassVar

from ksuit.callbacks.base import Callback

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

    from ksuit.trainers.base import BaseTrainer


def ksuit_console() -> Console:
    """The console of ksuit's rich log handler, if there is one, so log lines print above the
    bar (of several, the newest one on a terminal); otherwise a console on stderr."""
    from rich.console import Console
    from rich.logging import RichHandler

    handlers = [h for h in logging.getLogger("ksuit").handlers if isinstance(h, RichHandler)]
    if not handlers:
        return Console(stderr=True)
    on_terminal = [h for h in handlers if h.console.is_terminal]
    return (on_terminal or handlers)[-1].console


class ProgressBarCallback(Callback):
    """Shows updates done of the total, the time left and the current iteration (`E3_U70_S4480`).

    Only on rank 0 and only when the console is an interactive terminal; the bar disappears when
    training ends. `BaseTrainer(progress=True)` adds it. It is presentation only: it keeps no
    state and is left out of the trainer file (`saves_state = False`), so a run saved without a
    progress bar resumes with one, and the other way round.
    """

    order: ClassVar[int] = 100  # after every other callback of an update
    default_name: ClassVar[str] = "progress_bar"
    saves_state: ClassVar[bool] = False

    def __init__(self, name: str | None = None):
        super().__init__(name=name)
        self.progress: Progress | None = None
        self._task: TaskID | None = None

    def before_training(self, trainer: BaseTrainer) -> None:
        counter = trainer.update_counter
        if trainer.rank != 0 or counter.is_finished:
            return
        console = ksuit_console()
        if not console.is_terminal:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[iteration]}"),
            console=console,
            transient=True,
        )
        self._task = self.progress.add_task(
            trainer.model.name,
            total=counter.end_update,
            completed=counter.update,
            iteration=str(counter.cur_iteration),
        )
        self.progress.start()

    def after_update(self, trainer: BaseTrainer) -> None:
        if self.progress is not None and self._task is not None:
            self.progress.update(self._task, advance=1, iteration=str(trainer.update_counter.cur_iteration))

    def teardown(self, trainer: BaseTrainer) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
