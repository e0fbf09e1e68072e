"""The retention planner: a pure function from a folder's facts and a policy to a decision for
every set (keep or delete, and why), including the budget.

1. A set a guarantee protects is kept (the guarantee is its reason). Only committed
   progress-tag sets are ever unprotected (`ksuit.retention.facts`).
2. The rules look at every committed progress set of a group, protected or not (so `keep_last
   2` means the newest two); an unprotected set is kept when a rule keeps it (the rules are the
   reasons); the rest expire. `defer_rules` (before a save is written) keeps expired sets for now: a
   policy deletes only after the new set committed.
3. The budget: while the folder (plus `incoming`, the estimated bytes of the save about to be
   written) breaks `max_bytes` or leaves less than `min_free_bytes` free, sets are evicted,
   expired ones first, then those only rules keep, oldest first; never a protected one. When
   nothing more may go and it still does not fit, `shortfall` says why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ksuit.retention.facts import FolderFacts, SetFacts
from ksuit.retention.rules import rules_of
from ksuit.schemas.retention import RetentionPolicy
from ksuit.utils.units import human_bytes


@dataclass(frozen=True)
class Decision:
    set: SetFacts
    delete: bool
    reasons: tuple[str, ...]  # why it survives (rules or its guarantee), or why it goes


@dataclass(frozen=True)
class Plan:
    decisions: tuple[Decision, ...]
    bytes_before: int  # what the folder holds now (hard links once)
    bytes_after: int  # once the deletions are done (without `incoming`)
    incoming: int
    shortfall: str | None = None  # why the budget cannot be met
    sizes: Mapping[str, int] = field(default_factory=dict)  # manifest -> bytes of the set (links once)

    @property
    def deletions(self) -> list[SetFacts]:
        """The sets to delete, oldest first."""
        return sorted((d.set for d in self.decisions if d.delete), key=SetFacts.age_key)

    @property
    def protected(self) -> list[SetFacts]:
        return [d.set for d in self.decisions if d.set.guarantee is not None]


def plan(
    folder: FolderFacts,
    policy: RetentionPolicy,
    now_ns: int,
    incoming: int = 0,
    defer_rules: bool = False,
) -> Plan:
    """The decision for every set of `folder` (see the module docstring)."""
    reasons: dict[str, list[str]] = {}
    expired: list[SetFacts] = []
    by_rule: list[SetFacts] = []
    rules = rules_of(policy)
    for group in sorted({s.group for s in folder.sets}):
        # rules see every committed progress set of the group, protected ones too (the newest
        # two are the newest two, pinned or not); they decide about the unprotected ones
        ruled = sorted(
            (s for s in folder.sets if s.group == group and s.progress and s.committed), key=SetFacts.age_key
        )
        kept: dict[str, list[str]] = {}
        for rule in rules:
            for manifest, why in rule.keep(ruled, now_ns).items():
                kept.setdefault(manifest, []).append(why)
        for s in (s for s in ruled if s.guarantee is None):
            if not rules:
                reasons[s.manifest] = ["no keep rule: the policy is a budget only"]
                by_rule.append(s)
            elif s.manifest in kept:
                reasons[s.manifest] = kept[s.manifest]
                by_rule.append(s)
            else:
                expired.append(s)
    gone = set() if defer_rules else {s.manifest for s in expired}
    evicted = _evict(folder, policy, incoming, gone, expired if defer_rules else [], by_rule)
    names = {n for s in folder.sets if s.manifest in gone for n in s.names}
    after = folder.usage(names)
    shortfall = (
        None if _fits(folder, policy, incoming, names) else _shortfall(folder, policy, incoming, after)
    )
    decisions = []
    for s in folder.sets:
        if s.guarantee is not None:
            decisions.append(Decision(s, False, (s.guarantee,)))
        elif s.manifest in evicted:
            decisions.append(Decision(s, True, (evicted[s.manifest],)))
        elif s.manifest in gone:
            decisions.append(Decision(s, True, ("no rule keeps it",)))
        elif s.manifest in reasons:
            decisions.append(Decision(s, False, tuple(reasons[s.manifest])))
        else:
            decisions.append(Decision(s, False, ("no rule keeps it; deleted once the new set is committed",)))
    sizes = {s.manifest: folder.bytes_of(s.names) for s in folder.sets}
    return Plan(tuple(decisions), folder.usage(), after, incoming, shortfall, sizes)


def _evict(
    folder: FolderFacts,
    policy: RetentionPolicy,
    incoming: int,
    gone: set[str],
    expired: Sequence[SetFacts],
    by_rule: Sequence[SetFacts],
) -> dict[str, str]:
    """Adds to `gone` what the budget needs, expired sets first, then oldest first; returns
    `{manifest: why}` of the evicted."""
    evicted: dict[str, str] = {}
    pool = sorted(expired, key=SetFacts.age_key) + sorted(by_rule, key=SetFacts.age_key)
    names = {n for s in folder.sets if s.manifest in gone for n in s.names}
    for s in pool:
        if _fits(folder, policy, incoming, names):
            break
        gone.add(s.manifest)
        names.update(s.names)
        evicted[s.manifest] = f"evicted for the budget ({_budget(policy)}), oldest first"
    return evicted


def _fits(folder: FolderFacts, policy: RetentionPolicy, incoming: int, gone_names: set[str]) -> bool:
    after = folder.usage(gone_names)
    if policy.max_bytes is not None and after + incoming > policy.max_bytes:
        return False
    if policy.min_free_bytes is not None and folder.free_bytes is not None:
        freed = folder.usage() - after
        if folder.free_bytes + freed - incoming < policy.min_free_bytes:
            return False
    return True


def _budget(policy: RetentionPolicy) -> str:
    parts = []
    if policy.max_bytes is not None:
        parts.append(f"max_bytes {human_bytes(policy.max_bytes)}")
    if policy.min_free_bytes is not None:
        parts.append(f"min_free_bytes {human_bytes(policy.min_free_bytes)}")
    return ", ".join(parts)


def _shortfall(folder: FolderFacts, policy: RetentionPolicy, incoming: int, after: int) -> str:
    protected = sorted((s for s in folder.sets if s.guarantee is not None), key=SetFacts.age_key)
    listed = "; ".join(
        f"{s.label()} ({human_bytes(folder.bytes_of(s.names))}: {s.guarantee})" for s in protected[:20]
    )
    more = f"; and {len(protected) - 20} more" if len(protected) > 20 else ""
    free = "" if folder.free_bytes is None else f", {folder.free_bytes} bytes free on the disk"
    return (
        f"the next save needs about {incoming} bytes and the folder holds {after} bytes once every "
        f"set the policy may delete is gone ({_budget(policy)}{free}); protected: {listed or 'nothing'}{more}"
    )
