"""Training progress: where a run stands (`TrainingIteration`) and how it advances (`UpdateCounter`).

A `TrainingIteration` names a point in training by any of epoch, update (optimizer step) and
sample. Checkpoint tags are its string form, `E10_U200_S800`, so the same type parses file
names and decides when a run is finished.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

_FIELDS = ("epoch", "update", "sample")
_PREFIX = {"epoch": "E", "update": "U", "sample": "S"}
_PART_RE = re.compile(r"^(?P<letter>[EUS])(?P<value>\d+)$")
_LETTER_FIELD = {"E": "epoch", "U": "update", "S": "sample"}


class TrainingIteration:
    """A point in training given by any subset of epoch, update and sample counts."""

    __slots__ = ("epoch", "update", "sample")

    def __init__(self, epoch: int | None = None, update: int | None = None, sample: int | None = None):
        for field, value in (("epoch", epoch), ("update", update), ("sample", sample)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"TrainingIteration.{field} must be an int or None, got {value!r}")
            if value is not None and value < 0:
                raise ValueError(f"TrainingIteration.{field} must be >= 0, got {value}")
        self.epoch = epoch
        self.update = update
        self.sample = sample

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_string(cls, value: str) -> TrainingIteration:
        """Parses `E10_U200_S800` (or a subset such as `E10`, `U200`, `E10_U200`)."""
        if not isinstance(value, str):
            raise TypeError(f"expected a string like 'E10_U200_S800', got {type(value).__name__}")
        error = ValueError(
            f"'{value}' is not a training iteration; expected a form like 'E10_U200_S800' "
            "(E=epoch, U=update, S=sample; any subset in that order, joined by '_')"
        )
        values: dict[str, int] = {}
        order = "EUS"
        last = -1
        for part in value.split("_"):
            match = _PART_RE.match(part)
            if match is None or order.index(match["letter"]) <= last:
                raise error
            last = order.index(match["letter"])
            values[_LETTER_FIELD[match["letter"]]] = int(match["value"])
        return cls(**values)

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> TrainingIteration:
        unknown = set(value) - set(_FIELDS)
        if unknown:
            raise ValueError(
                f"unknown training iteration keys {sorted(unknown)}; known: {', '.join(_FIELDS)}"
            )
        return cls(**value)

    @staticmethod
    def is_progress_string(value: str) -> bool:
        """Whether `value` is a fully specified progress tag such as `E10_U200_S800`."""
        try:
            return TrainingIteration.from_string(value).is_fully_specified
        except (TypeError, ValueError):
            return False

    # ---- views --------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[str, int]]:
        """Yields `(field, value)` for the set fields, so `dict(it)` has only those keys."""
        for field in _FIELDS:
            value = getattr(self, field)
            if value is not None:
                yield field, value

    def _set_fields(self) -> tuple[str, ...]:
        return tuple(f for f in _FIELDS if getattr(self, f) is not None)

    @property
    def is_fully_specified(self) -> bool:
        return all(getattr(self, f) is not None for f in _FIELDS)

    @property
    def is_minimally_specified(self) -> bool:
        """Exactly one of epoch, update, sample is set (as in 'resume from epoch 10')."""
        return len(self._set_fields()) == 1

    def to_fully_specified(self, updates_per_epoch: int, effective_batch_size: int) -> TrainingIteration:
        """Derives the missing fields from a minimally specified iteration."""
        if updates_per_epoch <= 0 or effective_batch_size <= 0:
            raise ValueError("updates_per_epoch and effective_batch_size must be positive")
        if self.is_fully_specified:
            return self.copy()
        if not self.is_minimally_specified:
            raise ValueError(
                f"cannot fully specify {self!r}: give exactly one of epoch, update, sample "
                "(two fields may contradict each other)"
            )
        if self.epoch is not None:
            update = self.epoch * updates_per_epoch
            return TrainingIteration(self.epoch, update, update * effective_batch_size)
        if self.update is not None:
            return TrainingIteration(
                self.update // updates_per_epoch, self.update, self.update * effective_batch_size
            )
        assert self.sample is not None  # minimally specified, and neither epoch nor update
        update = math.ceil(self.sample / effective_batch_size)
        return TrainingIteration(update // updates_per_epoch, update, self.sample)

    def copy(self) -> TrainingIteration:
        return TrainingIteration(self.epoch, self.update, self.sample)

    def __str__(self) -> str:
        return "_".join(f"{_PREFIX[f]}{getattr(self, f)}" for f in self._set_fields())

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self)
        return f"TrainingIteration({args})"

    # ---- arithmetic and comparison ------------------------------------------------------
    def _check_same_fields(self, other: TrainingIteration, op: str) -> None:
        if self._set_fields() != other._set_fields():
            raise ValueError(
                f"cannot {op} {self!r} and {other!r}: they specify different fields "
                f"({self._set_fields()} vs {other._set_fields()})"
            )

    def _combine(self, other: TrainingIteration, sign: int, op: str) -> TrainingIteration:
        self._check_same_fields(other, op)
        values = {f: getattr(self, f) + sign * getattr(other, f) for f in self._set_fields()}
        return TrainingIteration(**values)

    def __add__(self, other: object) -> TrainingIteration:
        if not isinstance(other, TrainingIteration):
            return NotImplemented
        return self._combine(other, 1, "add")

    def __sub__(self, other: object) -> TrainingIteration:
        if not isinstance(other, TrainingIteration):
            return NotImplemented
        return self._combine(other, -1, "subtract")

    def _key(self) -> tuple[int, ...]:
        return tuple(getattr(self, f) for f in self._set_fields())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TrainingIteration):
            return NotImplemented
        return self._set_fields() == other._set_fields() and self._key() == other._key()

    def __hash__(self) -> int:
        return hash((self._set_fields(), self._key()))

    def _compare(self, other: object, op: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        if not isinstance(other, TrainingIteration):
            raise TypeError(f"'{op}' not supported between TrainingIteration and {type(other).__name__}")
        self._check_same_fields(other, "compare")
        return self._key(), other._key()

    def __lt__(self, other: object) -> bool:
        a, b = self._compare(other, "<")
        return a < b

    def __le__(self, other: object) -> bool:
        a, b = self._compare(other, "<=")
        return a <= b

    def __gt__(self, other: object) -> bool:
        a, b = self._compare(other, ">")
        return a > b

    def __ge__(self, other: object) -> bool:
        a, b = self._compare(other, ">=")
        return a >= b


class UpdateCounter:
    """Counts epochs, updates and samples from a start to an end iteration.

    The end may be given by any one of epoch, update or sample; it is made fully specified
    with `updates_per_epoch` and `effective_batch_size`. Training is finished once the field
    the end was given in is reached.
    """

    def __init__(
        self,
        start_iteration: TrainingIteration | None,
        end_iteration: TrainingIteration,
        updates_per_epoch: int,
        effective_batch_size: int,
    ):
        if not isinstance(updates_per_epoch, int) or updates_per_epoch <= 0:
            raise ValueError(f"updates_per_epoch must be a positive int, got {updates_per_epoch!r}")
        if not isinstance(effective_batch_size, int) or effective_batch_size <= 0:
            raise ValueError(f"effective_batch_size must be a positive int, got {effective_batch_size!r}")
        if not isinstance(end_iteration, TrainingIteration):
            raise TypeError("end_iteration must be a TrainingIteration, e.g. TrainingIteration(epoch=20)")
        start_iteration = start_iteration or TrainingIteration(0, 0, 0)
        self.updates_per_epoch = updates_per_epoch
        self.effective_batch_size = effective_batch_size
        self._end_fields = end_iteration._set_fields()
        self.start_iteration = start_iteration.to_fully_specified(updates_per_epoch, effective_batch_size)
        self.end_iteration = end_iteration.to_fully_specified(updates_per_epoch, effective_batch_size)
        self.cur_iteration = self.start_iteration.copy()

    @property
    def epoch(self) -> int:
        return _counted(self.cur_iteration.epoch, "epoch")

    @property
    def update(self) -> int:
        return _counted(self.cur_iteration.update, "update")

    @property
    def sample(self) -> int:
        return _counted(self.cur_iteration.sample, "sample")

    def next_epoch(self) -> None:
        self.cur_iteration.epoch = self.epoch + 1

    def next_update(self) -> None:
        self.cur_iteration.update = self.update + 1

    def add_samples(self, num_samples: int) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.cur_iteration.sample = self.sample + num_samples

    @property
    def end_update(self) -> int:
        """The update at which training ends."""
        return _counted(self.end_iteration.update, "end update")

    @property
    def at_epoch_end(self) -> bool:
        """Whether the update just made closes an epoch."""
        return self.update % self.updates_per_epoch == 0

    @property
    def is_finished(self) -> bool:
        end, cur = self.end_iteration, self.cur_iteration
        return any(getattr(cur, f) >= getattr(end, f) for f in self._end_fields)

    def state_dict(self) -> dict[str, int]:
        return dict(self.cur_iteration)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.cur_iteration = TrainingIteration.from_dict(dict(state))


def _counted(value: int | None, field: str) -> int:
    """A field of the counter's iteration, which is fully specified unless a partial state was loaded."""
    if value is None:
        raise ValueError(
            f"the update counter's iteration has no {field}; "
            "load a fully specified iteration such as {'epoch': 1, 'update': 8, 'sample': 64}"
        )
    return value
