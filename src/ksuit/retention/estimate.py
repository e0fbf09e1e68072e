"""How many progress sets a run holds at most under a policy, from the iterations it will save
at (what the checkpoint callback's disk estimate logs before training)."""

from __future__ import annotations

from collections.abc import Sequence

from ksuit.schemas.retention import RetentionPolicy

Iteration = tuple[int, int, int]  # (epoch, update, sample) of one save


def kept_at_most(policy: RetentionPolicy, saves: Sequence[Iteration]) -> int:
    """The most progress sets held at once when a run saves at `saves` (in order) under
    `policy`: right after each save commits, before retention deletes, the folder holds what the
    rules kept plus the new set. `keep_best` may keep its `n` anywhere (counted in full);
    `keep_within_hours` or no rule at all keeps every set, as far as the rules go (the budget
    caps the bytes, not the count)."""
    if not policy.has_rules or policy.keep_within_hours is not None:
        return len(saves)
    every = [
        (i, k)
        for i, k in enumerate(
            (policy.keep_every_epochs, policy.keep_every_updates, policy.keep_every_samples)
        )
        if k is not None
    ]
    best = sum(b.n for b in policy.best)
    last = policy.keep_last or 0
    milestones = 0
    seen: set[tuple[int, int]] = set()
    peak = 0
    for n, iteration in enumerate(saves):
        # before this save: the milestones so far, the last `keep_last`, the best
        peak = max(peak, min(n, milestones + last + best) + 1)
        hits = [(i, iteration[i]) for i, k in every if iteration[i] > 0 and iteration[i] % k == 0]
        if any(h not in seen for h in hits):
            milestones += 1
        seen.update(hits)
    return min(peak, len(saves))
