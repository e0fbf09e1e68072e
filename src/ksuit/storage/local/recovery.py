"""Recovery: completes committed set switches and discards uncommitted ones (the protocol is in
`ksuit.storage.local`).

Run by a writer before its first save in a process and before any save that finds a journal,
and by resume and `ksuit verify` before they read. Every journal is validated before any is
acted on (`ksuit.storage.journal`); then, oldest first, each journal is

- *completed* when every file it lists is intact, at its temporary name or already renamed into
  place (sizes and checksums recorded in the journal): the remaining renames are applied;
- *discarded* with its temporary files when some file is not intact: a power cut made the
  journal durable before all of its staged files, so the save never fully committed;
- for sets whose manifest already carries a newer commit sequence (a later save replaced them),
  never replayed: those temporary files are dropped instead;
- *left pending* and reported when it cannot be applied (a folder sits at a final name, the
  folder is read-only): nothing it would replace is touched and every other set stays usable.

A delete journal (an interrupted set delete of retention) is *finished*
(`ksuit.storage.local.deletion.finish_delete`): the set's manifest and files go, unless the
set was written again since.

Temporary files of ksuit's grammar that no pending journal names are then deleted; nothing else
is. Recovery that cannot write reports what it could not do instead of raising.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ksuit.layout import (
    is_journal_filename,
    is_sharded_filename,
    is_temp_filename,
    journal_sequence,
    temp_final_name,
)
from ksuit.storage.backend import PendingSwitch, RecoveryReport, folder_digest
from ksuit.storage.errors import UnsafeCheckpointError
from ksuit.storage.local.deletion import finish_delete
from ksuit.storage.local.files import fsync_dir
from ksuit.storage.local.folders import folder_parts, is_real_folder, move_aside, remove_folder
from ksuit.storage.local.journal import Journal, JournalEntry, read_journal
from ksuit.storage.local.locking import folder_lock
from ksuit.storage.local.safe_files import hash_regular_file, read_regular
from ksuit.storage.manifest import MAX_MANIFEST_BYTES

logger = logging.getLogger(__name__)


@dataclass
class _Plan:
    action: str  # "apply" | "discard" | "pending"
    renames: list[JournalEntry] = field(default_factory=list)
    drop_temps: list[str] = field(default_factory=list)
    reason: str = ""


def recover_folder(folder: str | Path) -> RecoveryReport:
    """Rolls committed set switches forward and removes leftovers of uncommitted ones.

    Raises `UnsafeCheckpointError`/`CorruptCheckpointError` naming a journal that is not a valid
    ksuit journal, before changing anything; reports (in `problems`) what it could not change.
    """
    folder = Path(folder)
    report = RecoveryReport()
    if not folder.is_dir():
        return report
    with folder_lock(folder):
        journals = _read_journals(folder)  # all validated before any is acted on
        keep: set[str] = set()
        for journal in journals:
            _recover_journal(folder, journal, report, keep)
        _remove_leftover_temps(folder, keep, report)
    _log(folder, report)
    return report


def journal_sequences(folder: Path) -> list[int]:
    """The sequences of the journals in `folder` (switches in progress or left by a failure)."""
    with os.scandir(folder) as entries:
        return [seq for e in entries if (seq := journal_sequence(e.name)) is not None]


def _read_journals(folder: Path) -> list[Journal]:
    with os.scandir(folder) as entries:
        paths = [Path(e.path) for e in entries if is_journal_filename(e.name)]
    journals = [read_journal(p) for p in paths]
    return sorted(journals, key=lambda j: (j.sequence, j.name))


def _recover_journal(folder: Path, journal: Journal, report: RecoveryReport, keep: set[str]) -> None:
    if journal.delete is not None:
        _recover_delete(folder, journal, report)
        return
    try:
        plan = _plan(folder, journal)
        if plan.action == "apply":
            _apply(folder, journal, plan, report)
            return
        if plan.action == "discard":
            _discard(folder, journal, plan, report)
            return
        reason = plan.reason
    except OSError as e:
        reason = (
            f"could not complete or discard the interrupted save recorded in {journal.path} ({e}); "
            "its files are left as they are: fix the cause (e.g. make the folder writable) and run "
            "`ksuit verify` on the run"
        )
    keep.update(x.temp for x in journal.entries)
    report.pending.append(PendingSwitch(journal.name, frozenset(x.final for x in journal.entries), reason))
    report.problems.append(reason)


def _recover_delete(folder: Path, journal: Journal, report: RecoveryReport) -> None:
    try:
        finish_delete(folder, journal, report)
    except OSError as e:
        reason = (
            f"could not finish the interrupted delete recorded in {journal.path} ({e}); fix the cause "
            "(e.g. make the folder writable) and run `ksuit verify` on the run"
        )
        report.pending.append(PendingSwitch(journal.name, frozenset(), reason))
        report.problems.append(reason)


def _plan(folder: Path, journal: Journal) -> _Plan:
    newer = _superseded_manifests(folder, journal)
    live = [e for e in journal.entries if not _is_superseded(e, newer)]
    stale = [e.temp for e in journal.entries if _is_superseded(e, newer)]
    staged, broken = [], []
    for entry in live:
        state = _entry_state(folder, entry)
        if state == "staged":
            staged.append(entry)
        elif state != "applied":
            broken.append(entry.final)
    if broken:
        return _Plan(
            "discard",
            drop_temps=[e.temp for e in journal.entries],
            reason=f"not every file of the save was staged intact ({', '.join(broken)})",
        )
    obstacles = [e.final for e in staged if _blocked(folder / e.final)]
    if obstacles:
        return _Plan(
            "pending",
            reason=(
                f"journal {journal.path} cannot be completed: {', '.join(obstacles)} in {folder} is a "
                "folder where the save puts a file (or a file where it puts a sharded checkpoint "
                "folder). Move it away, then run `ksuit verify` on the run (or save again) to "
                "complete that save; until then the files it would replace are untouched and every "
                "other set stays usable"
            ),
        )
    return _Plan("apply", renames=staged, drop_temps=stale)


def _is_superseded(entry: JournalEntry, newer: set[str]) -> bool:
    """A file whose set a later save already replaced (a standalone file: when any set of the
    journal was replaced)."""
    return entry.manifest in newer if entry.manifest is not None else bool(newer)


def _superseded_manifests(folder: Path, journal: Journal) -> set[str]:
    if journal.legacy:
        return set()
    return {m for m in journal.manifests() if manifest_sequence(folder / m) > journal.sequence}


def manifest_sequence(path: Path) -> int:
    """The commit sequence stamped into a manifest; 0 when it carries none or cannot be read."""
    try:
        doc = json.loads(read_regular(path, MAX_MANIFEST_BYTES, "manifest"))
    except (OSError, ValueError, UnsafeCheckpointError):
        return 0
    seq = doc.get("commit_sequence") if isinstance(doc, dict) else None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else 0


def _blocked(final: Path) -> bool:
    """Whether the rename onto `final` would fail: a folder where a file goes, or anything but a
    folder where a sharded checkpoint folder goes (an old folder there is moved aside)."""
    if is_sharded_filename(final.name):
        return os.path.lexists(final) and not is_real_folder(final)
    return _is_folder(final)


def _folder_intact(path: Path, entry: JournalEntry) -> bool:
    parts = folder_parts(path)
    return not isinstance(parts, str) and folder_digest(parts) == (entry.size, entry.checksum)


def _entry_state(folder: Path, entry: JournalEntry) -> str:
    """ "staged" (intact at its temporary name), "applied" (intact at its final name, no longer
    staged) or "broken"."""
    temp, final = folder / entry.temp, folder / entry.final
    if is_sharded_filename(entry.final) and entry.size is not None:  # a folder: every part intact
        if _folder_intact(temp, entry):
            return "staged"
        if not os.path.lexists(temp) and _folder_intact(final, entry):
            return "applied"
        return "broken"
    if entry.size is None:  # a journal of an older ksuit: no sizes or checksums to check
        if not os.path.lexists(temp):
            return "applied"
        return "staged" if stat.S_ISREG(os.lstat(temp).st_mode) else "broken"
    expected = (entry.size, entry.checksum)
    if hash_regular_file(temp) == expected:
        return "staged"
    if hash_regular_file(final) == expected:
        return "applied"
    return "broken"


def _is_folder(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _apply(folder: Path, journal: Journal, plan: _Plan, report: RecoveryReport) -> None:
    replaced = []
    for entry in plan.renames:
        final = folder / entry.final
        if is_sharded_filename(entry.final) and is_real_folder(final):
            replaced.append(move_aside(final))  # the folder of the set this save replaces
        os.replace(folder / entry.temp, final)
        report.rolled_forward.append(entry.final)
    _unlink_temps(folder, plan.drop_temps, report)
    fsync_dir(folder)
    os.unlink(journal.path)
    fsync_dir(folder)
    for old in replaced:
        _remove_temp_folder(old, report)
    if plan.drop_temps:
        report.discarded.append(f"{journal.name}: sets replaced by a later save were not rolled back")


def _discard(folder: Path, journal: Journal, plan: _Plan, report: RecoveryReport) -> None:
    _unlink_temps(folder, plan.drop_temps, report)
    fsync_dir(folder)
    os.unlink(journal.path)
    fsync_dir(folder)
    report.discarded.append(f"{journal.name}: {plan.reason}")
    logger.warning("discarded the uncommitted save %s in %s: %s", journal.name, folder, plan.reason)


def _is_staged_folder_name(name: str) -> bool:
    """A temporary name ksuit gives a staged (or replaced) sharded checkpoint folder."""
    final = temp_final_name(name)
    return final is not None and is_sharded_filename(final)


def _remove_temp_folder(path: Path, report: RecoveryReport) -> bool:
    try:
        problem = remove_folder(path)
    except OSError as e:
        problem = (
            f"could not remove the staged folder {path} ({e.strerror}); it belongs to no committed "
            "save and readers ignore it: delete it once the folder is writable"
        )
    if problem:
        report.problems.append(problem)
        return False
    report.removed_temps.append(path.name)
    return True


def _unlink_temps(folder: Path, names: list[str], report: RecoveryReport) -> None:
    for name in names:
        path = folder / name
        if _is_folder(path):
            if _is_staged_folder_name(name):
                _remove_temp_folder(path, report)
            continue
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        report.removed_temps.append(name)


def _remove_leftover_temps(folder: Path, keep: set[str], report: RecoveryReport) -> None:
    with os.scandir(folder) as entries:
        names = [e.name for e in entries if is_temp_filename(e.name) and e.name not in keep]
    removed = False
    for name in names:
        path = folder / name
        if _is_folder(path):
            if _is_staged_folder_name(name):
                removed = _remove_temp_folder(path, report) or removed
                continue
            report.problems.append(f"{path} is a folder named like a ksuit temporary file; move it away")
            continue
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        except OSError as e:
            report.problems.append(
                f"could not remove the leftover temporary file {path} ({e.strerror}); it belongs to a "
                "save that never committed and readers ignore it: delete it once the folder is writable"
            )
            continue
        report.removed_temps.append(name)
        removed = True
    if removed:
        try:
            fsync_dir(folder)
        except OSError as e:
            report.problems.append(f"could not fsync {folder} after removing temporary files ({e})")


def _log(folder: Path, report: RecoveryReport) -> None:
    if report.rolled_forward:
        logger.warning(
            "completed an interrupted checkpoint save in %s: %s", folder, ", ".join(report.rolled_forward)
        )
    if report.deleted:
        logger.warning("finished an interrupted set delete in %s: %s", folder, ", ".join(report.deleted))
    if report.removed_temps:
        logger.info("removed %d leftover temporary files in %s", len(report.removed_temps), folder)
    for problem in report.problems:
        logger.warning("checkpoint recovery in %s: %s", folder, problem)


_RECOVERED: set[str] = set()
_RECOVERED_LOCK = threading.Lock()


def _reset_in_child() -> None:
    global _RECOVERED_LOCK
    _RECOVERED_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_reset_in_child)


def ensure_recovered(folder: Path) -> RecoveryReport | None:
    """Full recovery once per folder and process, when the first writer starts on it (again
    after a recovery that raised). None when it already ran."""
    key = str(folder.resolve())
    with _RECOVERED_LOCK:
        if key in _RECOVERED:
            return None
    report = recover_folder(folder)
    with _RECOVERED_LOCK:
        _RECOVERED.add(key)
    return report
