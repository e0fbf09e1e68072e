"""Retention rules: small, composable, one method each (in the style of Orbax's preservation
policies), separate from the planner that combines them and the code that deletes.

A rule looks at the candidate sets of one group (committed progress-tag sets no guarantee
protects, oldest first) and says which it keeps and why. A set survives when any rule keeps it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ksuit.retention.facts import SetFacts
from ksuit.schemas.retention import RetentionPolicy


class Rule(Protocol):
    def keep(self, sets: Sequence[SetFacts], now_ns: int) -> dict[str, str]:
        """`{manifest: why}` for the sets this rule keeps among `sets` (one group, oldest first)."""
        ...


@dataclass(frozen=True)
class KeepLast:
    """The newest `n` sets."""

    n: int

    def keep(self, sets: Sequence[SetFacts], now_ns: int) -> dict[str, str]:
        newest = sets[-self.n :]
        return {s.manifest: f"keep_last {self.n}" for s in newest}


@dataclass(frozen=True)
class KeepEvery:
    """Milestones: the first set whose `unit` count (epoch, update, sample) is a positive
    multiple of `k`."""

    unit: str
    k: int

    def keep(self, sets: Sequence[SetFacts], now_ns: int) -> dict[str, str]:
        kept: dict[str, str] = {}
        seen: set[int] = set()
        for s in sets:
            value = getattr(s.iteration, self.unit, None) if s.iteration is not None else None
            if value is None or value <= 0 or value % self.k or value in seen:
                continue
            seen.add(value)
            kept[s.manifest] = f"keep_every_{self.unit}s {self.k} ({self.unit} {value})"
        return kept


@dataclass(frozen=True)
class KeepBestOf:
    """The `n` sets with the best recorded value of `metric` (`mode` min or max); sets without
    a finite value for it are never kept by this rule. On equal values the newer set wins."""

    metric: str
    mode: str
    n: int

    def keep(self, sets: Sequence[SetFacts], now_ns: int) -> dict[str, str]:
        scored = [
            (s.metrics[self.metric], -i, s)
            for i, s in enumerate(sets)
            if self.metric in s.metrics and math.isfinite(s.metrics[self.metric])
        ]
        sign = 1.0 if self.mode == "min" else -1.0
        scored.sort(key=lambda x: (sign * x[0], x[1]))
        return {
            s.manifest: f"keep_best {self.metric}:{self.mode}:{self.n} ({self.metric} {value:.6g}, #{rank})"
            for rank, (value, _, s) in enumerate(scored[: self.n], start=1)
        }


@dataclass(frozen=True)
class KeepWithin:
    """Every set saved within the last `hours` (by its commit time)."""

    hours: float

    def keep(self, sets: Sequence[SetFacts], now_ns: int) -> dict[str, str]:
        window = self.hours * 3600e9
        return {
            s.manifest: f"keep_within_hours {self.hours:g} (saved {(now_ns - s.saved_ns) / 3600e9:.2g} h ago)"
            for s in sets
            if s.saved_ns is not None and now_ns - s.saved_ns <= window
        }


def rules_of(policy: RetentionPolicy) -> list[Rule]:
    """The rules a policy sets, in a fixed order (the order reasons are reported in)."""
    rules: list[Rule] = []
    if policy.keep_last is not None:
        rules.append(KeepLast(policy.keep_last))
    for unit in ("epoch", "update", "sample"):
        k = getattr(policy, f"keep_every_{unit}s")
        if k is not None:
            rules.append(KeepEvery(unit, k))
    rules += [KeepBestOf(b.metric, b.mode, b.n) for b in policy.best]
    if policy.keep_within_hours is not None:
        rules.append(KeepWithin(policy.keep_within_hours))
    return rules
