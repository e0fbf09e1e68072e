"""Retention: which checkpoint sets a run keeps, deleted safely, within a disk budget.

- `RetentionPolicy` (`ksuit.schemas.retention`): the rules (`keep_last`, `keep_every_epochs`,
  `keep_best`, ...) and the budget (`max_bytes`, `min_free_bytes`), as Python or YAML;
- `rules`: each rule a small class with one method; `planner.plan`: a pure function from the
  folder's facts (`facts.gather`) to a decision for every set with its reasons;
- `Retention`: applies a policy around every save of a `CheckpointWriter`
  (`CheckpointWriter(..., retention=...)`); `prune`: applies one now (`ksuit prune`);
  `pin` / `unpin`: protect a tag (`ksuit pin`).

Whatever the policy, retention never deletes the newest complete resumable set, the set resume
would pick, `latest`, `last`, `best_*` or any other named tag, pinned sets, sets that are not
committed or that a queued save still writes; and it deletes a set crash-safely
(`Backend.delete_set`).
"""

from ksuit.retention.apply import Retention, apply_plan, pin, pinned_tags, prune, unpin
from ksuit.retention.facts import FolderFacts, SetFacts, gather
from ksuit.retention.pins import read_pins, write_pins
from ksuit.retention.planner import Decision, Plan, plan
from ksuit.retention.rules import KeepBestOf, KeepEvery, KeepLast, KeepWithin, Rule, rules_of
from ksuit.schemas.retention import KeepBest, RetentionPolicy

__all__ = [
    "Decision",
    "FolderFacts",
    "KeepBest",
    "KeepBestOf",
    "KeepEvery",
    "KeepLast",
    "KeepWithin",
    "Plan",
    "Retention",
    "RetentionPolicy",
    "Rule",
    "SetFacts",
    "apply_plan",
    "gather",
    "pin",
    "pinned_tags",
    "plan",
    "prune",
    "read_pins",
    "rules_of",
    "unpin",
    "write_pins",
]
