"""`RetentionPolicy`: which checkpoint sets a run keeps, and how much disk it may use.

The same model is the Python argument (`CheckpointWriter(..., retention=RetentionPolicy(...))`)
and the YAML section (`retention:` at the top of a run config or under a checkpoint callback).
`ksuit.retention` applies it; this module only says what a policy is.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ksuit.utils.units import human_bytes, parse_bytes

_Count = Annotated[int, Field(gt=0, strict=True)]


class KeepBest(BaseModel):
    """Keep the `n` sets with the best value of `metric` (as recorded in their manifests when
    they were saved): the smallest with `mode: min`, the largest with `mode: max`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: Annotated[str, Field(min_length=1, max_length=200)]
    """A metric name as the trainer logs it, e.g. `loss/val`."""
    mode: Literal["min", "max"] = "min"
    n: _Count = 1


class RetentionPolicy(BaseModel):
    """Which committed progress-tag sets (`E10_U200_S800`) of each group survive: a set survives
    when any rule keeps it. Sets under other tags (`latest`, `last`, `best_*`, any name) are never
    deleted, and neither are the guarantees of `ksuit.retention` (the set resume would pick,
    pinned sets, ...). With no rule at all every set is kept and the policy is a budget only.

    The budget: before a save is written, sets the policy may delete go (oldest first) until
    the folder, with the new set, fits in `max_bytes` and leaves `min_free_bytes` free on the
    disk; a save that cannot fit fails with ENOSPC before anything is written.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    keep_last: _Count | None = None
    """Keep the newest N sets of each group."""
    keep_every_epochs: _Count | None = None
    """Keep a milestone every K epochs: the first set at each epoch count that is a multiple of K."""
    keep_every_updates: _Count | None = None
    """Keep the set at every update count that is a multiple of K."""
    keep_every_samples: _Count | None = None
    """Keep the set at every sample count that is a multiple of K."""
    keep_best: KeepBest | list[KeepBest] | None = None
    """Keep the best N sets by a metric recorded when they were saved (one rule or a list)."""
    keep_within_hours: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    """Keep every set saved within the last H hours."""
    max_bytes: int | None = None
    """At most this many bytes in the checkpoint folder (hard links counted once): an int or a
    string such as "20GiB" or "500MB"."""
    min_free_bytes: int | None = None
    """Leave at least this many bytes free on the disk (an int or a string such as "2GiB")."""

    @field_validator("max_bytes", "min_free_bytes", mode="before")
    @classmethod
    def _bytes(cls, value: Any) -> int | None:
        return None if value is None else parse_bytes(value)

    @property
    def best(self) -> tuple[KeepBest, ...]:
        if self.keep_best is None:
            return ()
        return tuple(self.keep_best) if isinstance(self.keep_best, list) else (self.keep_best,)

    @property
    def has_rules(self) -> bool:
        """Whether any keep rule is set (without one, every set is kept)."""
        return bool(
            self.keep_last
            or self.keep_every_epochs
            or self.keep_every_updates
            or self.keep_every_samples
            or self.best
            or self.keep_within_hours
        )

    @property
    def has_budget(self) -> bool:
        return self.max_bytes is not None or self.min_free_bytes is not None

    def describe(self) -> str:
        """`keep_last 2, keep_every_epochs 10, max_bytes 20.0 GiB` (what logs and errors show)."""
        parts = [
            f"{name} {getattr(self, name)}"
            for name in (
                "keep_last",
                "keep_every_epochs",
                "keep_every_updates",
                "keep_every_samples",
                "keep_within_hours",
            )
            if getattr(self, name) is not None
        ]
        parts += [f"keep_best {b.metric}:{b.mode}:{b.n}" for b in self.best]
        if self.max_bytes is not None:
            parts.append(f"max_bytes {human_bytes(self.max_bytes)}")
        if self.min_free_bytes is not None:
            parts.append(f"min_free_bytes {human_bytes(self.min_free_bytes)}")
        return ", ".join(parts) or "keep everything"
