"""Applying a retention policy: around every save of a writer (`Retention`, the storage layer's
`SaveHooks`) and on demand (`prune`, `ksuit prune`); pinning tags (`pin`, `unpin`).

Around a save, on the thread that writes it (the background thread for asynchronous saves):

- *before* anything is staged, with the folder lock held, and only when the policy has a
  budget: sets are evicted until the save fits (`ksuit.retention.planner`; the save's size is
  estimated from what the same files took last time, `facts.estimate_incoming`); when it cannot fit,
  `OSError(ENOSPC)` names the bytes needed, the budget and what is protected, and nothing is
  written or deleted;
- *after* the save committed: every set the policy no longer keeps is deleted, then the budget
  is met again. A failure here is logged, not raised: the save itself is on disk.

Every delete goes through `Backend.delete_set` (crash-safe: the set disappears whole).
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections import Counter
from collections.abc import Mapping

from ksuit.readers.listing import checkpoint_folder, read_folder
from ksuit.readers.sets import scan_sets
from ksuit.retention.facts import FolderFacts, Verified, estimate_incoming, gather
from ksuit.retention.pins import read_pins, write_pins
from ksuit.retention.planner import Plan, plan
from ksuit.schemas.retention import RetentionPolicy
from ksuit.storage import Backend, CorruptCheckpointError, Location, PendingFile, UnsafeCheckpointError

logger = logging.getLogger(__name__)


class Retention:
    """A policy applied to one writer's checkpoint folder around each of its saves (see the
    module docstring). `submitted` marks the sets of a save handed to the writer, so retention
    never deletes a set a queued save is still to write."""

    def __init__(self, policy: RetentionPolicy):
        if not isinstance(policy, RetentionPolicy):
            raise TypeError(
                f"retention must be a ksuit.retention.RetentionPolicy, got {type(policy).__name__}"
            )
        self.policy = policy
        self.verified = Verified()
        self._in_flight: Counter[str] = Counter()
        self._lock = threading.Lock()

    def submitted(self, files: list[PendingFile]) -> None:
        with self._lock:
            self._in_flight.update({f.manifest for f in files if f.manifest is not None})

    def released(self, files: list[PendingFile]) -> None:
        """The save of `files` is over (written, failed, or never queued)."""
        with self._lock:
            for manifest in {f.manifest for f in files if f.manifest is not None}:
                if self._in_flight[manifest] > 1:
                    self._in_flight[manifest] -= 1
                else:
                    self._in_flight.pop(manifest, None)

    def in_flight(self) -> set[str]:
        with self._lock:
            return {m for m, n in self._in_flight.items() if n > 0}

    def facts(self, backend: Backend) -> FolderFacts:
        return gather(backend, read_pins(backend), self.in_flight(), self.verified)

    # ---- SaveHooks ------------------------------------------------------------------------------
    def before_save(self, backend: Backend, files: list[PendingFile], needed_bytes: int) -> None:
        if not self.policy.has_budget:
            return
        backend.recover()
        listing = read_folder(backend)
        incoming = estimate_incoming(files, listing)
        facts = gather(backend, read_pins(backend), self.in_flight(), self.verified, listing)
        decided = plan(facts, self.policy, time.time_ns(), incoming=incoming, defer_rules=True)
        if decided.shortfall is not None:
            raise budget_error(backend, decided)
        apply_plan(backend, decided)

    def after_save(
        self, backend: Backend, files: list[PendingFile], committed: Mapping[str, int] | None
    ) -> None:
        self.released(files)
        if committed is None:
            return
        self.verified.add_written(committed)
        try:
            decided = plan(self.facts(backend), self.policy, time.time_ns())
            apply_plan(backend, decided)
        except Exception as e:  # the save is on disk; the next save tries again
            logger.error(
                "retention (%s) could not run in %s after a save: %s; the save itself is complete",
                self.policy.describe(),
                backend.location,
                e,
                exc_info=not isinstance(e, (OSError, CorruptCheckpointError, UnsafeCheckpointError)),
            )
            return
        if decided.shortfall is not None:
            logger.warning("retention in %s cannot meet its budget: %s", backend.location, decided.shortfall)


def apply_plan(backend: Backend, decided: Plan) -> list[str]:
    """Deletes the sets `decided` deletes, oldest first, each crash-safely; returns their labels."""
    deleted = []
    for s in decided.deletions:
        backend.delete_set(s.manifest)
        why = next(d.reasons for d in decided.decisions if d.set is s)
        logger.info("retention: deleted %s (%s): %s", s.label(), s.iteration, "; ".join(why))
        deleted.append(s.label())
    return deleted


def budget_error(backend: Backend, decided: Plan) -> OSError:
    return OSError(
        errno.ENOSPC,
        f"No space left for the next checkpoint in {backend.location} under the retention budget: "
        f"{decided.shortfall}. Nothing was written or deleted; raise the budget, free disk space or "
        "unpin sets (`ksuit unpin`)",
        backend.location,
    )


def prune(run_dir: Location | Backend, policy: RetentionPolicy, dry_run: bool = False) -> Plan:
    """Applies `policy` to a run's checkpoint folder now (what `ksuit prune` does): under the
    folder lock, after recovery; returns the plan (what goes and why each set stays). With
    `dry_run` nothing is deleted."""
    folder = checkpoint_folder(run_dir)
    with folder.lock():
        folder.recover()
        decided = plan(gather(folder, read_pins(folder)), policy, time.time_ns())
        if not dry_run:
            apply_plan(folder, decided)
    return decided


def pin(run_dir: Location | Backend, tag: str) -> bool:
    """Protects the sets of `tag` (every group) from retention; False when it already was."""
    folder = checkpoint_folder(run_dir)
    with folder.lock():
        tags = {s.tag for s in scan_sets(folder)}
        if tag not in tags:
            known = ", ".join(sorted(tags)[:20]) or "none"
            raise FileNotFoundError(
                f"no checkpoint set has the tag '{tag}' in {folder.location} (tags: {known})"
            )
        pins = read_pins(folder)
        if tag in pins:
            return False
        write_pins(folder, pins | {tag})
    return True


def unpin(run_dir: Location | Backend, tag: str) -> None:
    """Lets retention decide about the sets of `tag` again."""
    folder = checkpoint_folder(run_dir)
    with folder.lock():
        pins = read_pins(folder)
        if tag not in pins:
            known = ", ".join(sorted(pins)[:20]) or "none"
            raise ValueError(f"'{tag}' is not pinned in {folder.location} (pinned: {known})")
        write_pins(folder, pins - {tag})


def pinned_tags(run_dir: Location | Backend) -> set[str]:
    return read_pins(checkpoint_folder(run_dir))
