"""Callbacks: code the trainer runs around updates, with state that survives resume.

Every callback has a unique `name` (its key in the trainer file's `callback_state_dicts`) and
`state_dict()`/`load_state_dict()`. Within one update the trainer runs callbacks by ascending
`order`, then by their position in the list: metric producers (order 0) first, then writers of
extra files (10), then `CheckpointCallback` (20), whose trainer file must capture everything the
others did at that update. Presentation callbacks (the progress bar) set `saves_state = False`:
they take no part in the trainer file, so a run resumes the same with or without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from ksuit.trainers.base import BaseTrainer


class Callback:
    """Base of every callback; every hook does nothing by default."""

    order: ClassVar[int] = 0
    default_name: ClassVar[str] = "callback"
    saves_state: ClassVar[bool] = True
    """Whether the trainer file holds this callback's state (and a resume requires it by name)."""

    def __init__(self, name: str | None = None):
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"callback name must be a non-empty str, got {name!r}")
        self.name = name or self.default_name
        self.name_is_default = name is None

    def before_training(self, trainer: BaseTrainer) -> None:
        """After weights (and, when resuming, the trainer state) are loaded, before the first update."""

    def after_update(self, trainer: BaseTrainer) -> None:
        """After every optimizer update; the update counter already counts it."""

    def after_training(self, trainer: BaseTrainer) -> None:
        """Once training reached its end (not when it stops on a signal)."""

    def on_resumable_save(self, trainer: BaseTrainer, tags: list[str]) -> None:
        """A trainer file was just written under each of `tags`: a resume may start there."""

    def teardown(self, trainer: BaseTrainer) -> None:
        """Whenever `fit` ends: after training, on a signal stop or on an error (also one raised
        before `before_training` ran). Releases what the other hooks acquired, e.g. a display."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            raise ValueError(f"callback '{self.name}' keeps no state but got {sorted(state_dict)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def with_unique_names(callbacks: list[Callback]) -> list[Callback]:
    """`callbacks` after checking their types and names: explicit names must be unique, and
    default names get a suffix where they repeat (`checkpoint`, `checkpoint.2`, ...)."""
    for cb in callbacks:
        if not isinstance(cb, Callback):
            raise TypeError(f"callbacks must be ksuit.callbacks.Callback instances, got {type(cb).__name__}")
    explicit = [cb.name for cb in callbacks if not cb.name_is_default]
    duplicates = sorted({n for n in explicit if explicit.count(n) > 1})
    if duplicates:
        raise ValueError(f"callback names must be unique; repeated: {', '.join(duplicates)}")
    taken = set(explicit)
    for cb in callbacks:
        if cb.name_is_default:
            name, i = cb.name, 1
            while name in taken:
                i += 1
                name = f"{cb.name}.{i}"
            cb.name = name
            taken.add(name)
    return callbacks


class PeriodicCallback(Callback):
    """A callback whose `invoke()` runs every n epochs, updates and/or samples.

    With several periods it runs when any of them is due, at most once per update. With none it
    runs every `default_every_n_epochs` epochs when a subclass sets that, and otherwise never
    periodically (only its other hooks do).
    """

    default_every_n_epochs: int | None = None

    def __init__(
        self,
        every_n_epochs: int | None = None,
        every_n_updates: int | None = None,
        every_n_samples: int | None = None,
        name: str | None = None,
    ):
        super().__init__(name=name)
        for what, value in (
            ("every_n_epochs", every_n_epochs),
            ("every_n_updates", every_n_updates),
            ("every_n_samples", every_n_samples),
        ):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{what} must be a positive int or None, got {value!r}")
        if every_n_epochs is None and every_n_updates is None and every_n_samples is None:
            every_n_epochs = self.default_every_n_epochs
        self.every_n_epochs = every_n_epochs
        self.every_n_updates = every_n_updates
        self.every_n_samples = every_n_samples

    def is_due(self, trainer: BaseTrainer) -> bool:
        """Whether the update that just finished completes one of the periods."""
        counter = trainer.update_counter
        if (
            self.every_n_epochs is not None
            and counter.at_epoch_end
            and counter.epoch % self.every_n_epochs == 0
        ):
            return True
        if self.every_n_updates is not None and counter.update % self.every_n_updates == 0:
            return True
        if self.every_n_samples is not None:
            before = counter.sample - counter.effective_batch_size
            if counter.sample // self.every_n_samples > before // self.every_n_samples:
                return True
        return False

    def invocations_between(
        self, start_update: int, end_update: int, updates_per_epoch: int, effective_batch_size: int
    ) -> int:
        """How many times `invoke` runs for updates `start_update + 1 .. end_update`."""
        return len(self.updates_between(start_update, end_update, updates_per_epoch, effective_batch_size))

    def updates_between(
        self, start_update: int, end_update: int, updates_per_epoch: int, effective_batch_size: int
    ) -> list[int]:
        """The updates among `start_update + 1 .. end_update` after which `invoke` runs."""
        return [
            u
            for u in range(start_update + 1, end_update + 1)
            if (
                self.every_n_epochs is not None
                and u % updates_per_epoch == 0
                and (u // updates_per_epoch) % self.every_n_epochs == 0
            )
            or (self.every_n_updates is not None and u % self.every_n_updates == 0)
            or (
                self.every_n_samples is not None
                and u * effective_batch_size // self.every_n_samples
                > (u - 1) * effective_batch_size // self.every_n_samples
            )
        ]

    def after_update(self, trainer: BaseTrainer) -> None:
        if self.is_due(trainer):
            self.invoke(trainer)

    def invoke(self, trainer: BaseTrainer) -> None:
        """The periodic action."""
        raise NotImplementedError(f"{type(self).__name__} must implement invoke(trainer)")

    def __repr__(self) -> str:
        periods = ", ".join(
            f"{k}={v}"
            for k, v in (
                ("every_n_epochs", self.every_n_epochs),
                ("every_n_updates", self.every_n_updates),
                ("every_n_samples", self.every_n_samples),
            )
            if v is not None
        )
        return f"{type(self).__name__}(name={self.name!r}{', ' + periods if periods else ''})"
