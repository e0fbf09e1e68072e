"""Checkpoint sets: the files one tag of one group holds, checked against their manifest.

Resume reads only sets that are complete (every file present with its recorded size and
checksum) and consistent (every file written at the same training iteration). A set whose
manifest cannot be read (damaged, wrongly typed, not a regular file) or that has a file that
is not a regular file (a symbolic link, FIFO, device) is reported with its problem and skipped;
other sets are unaffected.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from ksuit.layout import parse_checkpoint_filename, parse_manifest_filename
from ksuit.readers.listing import (
    CheckpointInfo,
    FolderListing,
    checkpoint_folder,
    listed_checkpoints,
    read_folder,
)
from ksuit.storage import Backend, Entry, Location
from ksuit.storage.manifest import Manifest, verify_file
from ksuit.utils.training import TrainingIteration


@dataclass
class CheckpointSet:
    group: str
    tag: str
    folder: Backend
    manifest: Manifest | None
    files: dict[str, CheckpointInfo] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)
    checksums_verified: bool = False
    # copies of members in another format that the manifest does not list (`ksuit export`):
    # standalone files beside the set, not part of it, never loaded by resume
    others: dict[str, CheckpointInfo] = field(default_factory=dict)
    irregular: dict[str, str] = field(default_factory=dict)  # names that are not regular files

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def training_iteration(self) -> TrainingIteration | None:
        if self.manifest is not None and self.manifest.training_iteration:
            return TrainingIteration.from_dict(self.manifest.training_iteration)
        for info in self.files.values():
            if info.training_iteration is not None:
                return info.training_iteration
        return None

    @property
    def size_bytes(self) -> int:
        return sum(i.size_bytes for i in self.files.values())

    def file(self, model_name: str, role: str) -> CheckpointInfo | None:
        for info in self.files.values():
            if info.model_name == model_name and info.role == role:
                return info
        return None

    def check(self, checksum: bool, entries: Mapping[str, Entry] | None = None) -> None:
        """Fills `problems`: missing/short/altered files, files from mixed iterations.
        `entries`: the folder's listing, when the caller has it."""
        self.problems = {}
        if self.manifest is None:
            self.problems["(manifest)"] = "no manifest: the set cannot be verified"
            return
        if entries is None:
            entries = {e.name: e for e in self.folder.entries()}
        for name, entry in self.manifest.files.items():
            problem = verify_file(self.folder, name, entry, checksum=checksum, entries=entries)
            if problem is not None:
                self.problems[name] = problem
        for name in self.files:
            if name not in self.manifest.files:
                self.problems[name] = "not listed in the manifest"
        self.problems.update(self.irregular)
        iterations = self.manifest.iterations()
        if len(iterations) > 1:
            by_file = {
                n: str(TrainingIteration.from_dict(e.training_iteration)) if e.training_iteration else "?"
                for n, e in self.manifest.files.items()
            }
            self.problems["(iterations)"] = "files from different iterations: " + ", ".join(
                f"{n}@{it}" for n, it in sorted(by_file.items())
            )
        self.checksums_verified = checksum


def scan_sets(run_dir: Location | Backend, checksum: bool = False) -> list[CheckpointSet]:
    """Every set of a run (one per group and tag), checked against its manifest."""
    return sets_of(read_folder(checkpoint_folder(run_dir)), checksum)


def sets_of(listing: FolderListing, checksum: bool = False) -> list[CheckpointSet]:
    """`scan_sets` of a folder already read."""
    folder = listing.folder
    sets: dict[tuple[str, str], CheckpointSet] = {}
    for name, manifest in listing.manifests.items():
        group, tag = parse_manifest_filename(name) or (manifest.group, manifest.tag)
        sets[(group, tag)] = CheckpointSet(group, tag, folder, manifest)
    for name, problem in listing.unreadable.items():
        parsed = parse_manifest_filename(name)
        if parsed is not None:
            s = CheckpointSet(*parsed, folder, None)
            s.problems["(manifest)"] = problem
            sets[parsed] = s
    owner = {name: key for key, s in sets.items() if s.manifest for name in s.manifest.files}
    # a member in another format (`ksuit export` writes x_model.safetensors beside x_model.th)
    same_name = {_without_ext(name): key for name, key in owner.items()}
    for info in listed_checkpoints(listing):
        if info.name not in owner and _without_ext(info.name) in same_name:
            sets[same_name[_without_ext(info.name)]].others[info.name] = info
            continue
        key = owner.get(info.name, (info.group, info.tag))
        if key not in sets:
            sets[key] = CheckpointSet(info.group, info.tag, folder, None)
        sets[key].files[info.name] = info
    for name, problem in listing.irregular.items():
        parsed_file = parse_checkpoint_filename(name)
        found = owner.get(name) or (
            (parsed_file.group, parsed_file.tag) if parsed_file else parse_manifest_filename(name)
        )
        if found is None:
            continue
        key = found
        if key not in sets:
            sets[key] = CheckpointSet(*key, folder, None)
        sets[key].irregular[name] = problem
    for s in sets.values():
        if "(manifest)" not in s.problems:
            s.check(checksum, listing.entries)
        s.problems.update(s.irregular)
    return sorted(sets.values(), key=lambda s: (s.group, _sort_key(s)))


def _without_ext(filename: str) -> str:
    return filename.rsplit(".", 1)[0]


def _sort_key(s: CheckpointSet) -> tuple:
    it = s.training_iteration
    if it is None or not it.is_fully_specified:
        return (-1, -1, -1, s.tag)
    return (it.update, it.epoch, it.sample, s.tag)


def _matches(s: CheckpointSet, wanted: str | TrainingIteration) -> bool:
    if isinstance(wanted, str):
        return s.tag == wanted
    it = s.training_iteration
    if it is None:
        return False
    return all(getattr(it, k) == v for k, v in wanted)


def select_resume_set(
    run_dir: Location | Backend,
    group: str,
    tag: str | TrainingIteration | None = None,
    required: Iterable[tuple[str, str]] = (),
) -> tuple[CheckpointSet, list[tuple[str, str]]]:
    """The newest complete, consistent set of `group` that has a trainer file and every
    `(model name, kind)` in `required`; also returns `(tag, reason)` for every set skipped.

    Interrupted saves are first rolled forward (or discarded) by recovery. A minimal
    `TrainingIteration` such as `epoch=10` selects by iteration instead of by tag.
    """
    folder = checkpoint_folder(run_dir)
    # hold the folder still: a save in flight in another process finishes first
    with folder.lock():
        return _select_resume_set_locked(folder, group, tag, list(required))


def _select_resume_set_locked(
    folder: Backend, group: str, tag: str | TrainingIteration | None, required: list[tuple[str, str]]
) -> tuple[CheckpointSet, list[tuple[str, str]]]:
    return choose_set(folder, group, tag, required, checksum_problems)


class NoCheckpointsError(FileNotFoundError):
    """The folder holds no set of the group at all (a fresh run), not merely no usable one."""


Accept = Callable[[CheckpointSet], "str | None"]
"""Takes a set that passed every check short of its checksums: None to choose it, or why not."""


def choose_set(
    folder: Backend,
    group: str,
    tag: str | TrainingIteration | None,
    required: list[tuple[str, str]],
    accept: Accept,
) -> tuple[CheckpointSet, list[tuple[str, str]]]:
    """The newest set of `group` that is complete, consistent, has a trainer file and the
    `required` files, and that `accept` takes; with `(tag, reason)` of every set skipped. Call it
    with the folder locked. Recovery first completes or discards an interrupted save."""
    folder.recover()
    found = scan_sets(folder, checksum=False)
    candidates = [s for s in found if s.group == group]
    if not candidates:
        groups = sorted({s.group for s in found})
        raise NoCheckpointsError(
            f"no checkpoints of '{group}' in {folder.location}"
            + (f"; found: {', '.join(groups)}" if groups else "")
        )
    if tag is not None:
        candidates = [s for s in candidates if _matches(s, tag)]
        if not candidates:
            raise FileNotFoundError(f"no checkpoint set of '{group}' matches {tag!s} in {folder.location}")
    candidates = resume_order(candidates)
    skipped: list[tuple[str, str]] = []
    for i, s in enumerate(candidates):
        reason = _unusable_reason(s, group, required)
        if reason is None:
            reason = accept(s)
        if reason is None:
            # sets whose iteration is unknown (e.g. an unreadable manifest) sort last but may be
            # newer: report them too, so a damaged 'latest' is never passed over silently
            for other in candidates[i + 1 :]:
                if other.training_iteration is None and not other.ok:
                    skipped.append((other.tag, _unusable_reason(other, group, required) or "unverifiable"))
            return s, skipped
        skipped.append((s.tag, reason))
    details = "; ".join(f"{t}: {r}" for t, r in skipped)
    raise FileNotFoundError(f"no usable checkpoint set of '{group}' in {folder.location} ({details})")


def checksum_problems(s: CheckpointSet) -> str | None:
    """None when every file of `s` matches its manifest's checksum (read now), else what does not."""
    s.check(checksum=True)
    return None if s.ok else problems_text(s.problems)


def problems_text(problems: Mapping[str, str]) -> str:
    return "; ".join(f"{k}: {v}" for k, v in problems.items())


def resume_order(sets: Iterable[CheckpointSet]) -> list[CheckpointSet]:
    """`sets` in the order resume tries them: newest first; on equal iterations the rolling
    'latest' first (it is what resume writes)."""
    return sorted(sets, key=lambda s: (_sort_key(s)[:3], s.tag == "latest"), reverse=True)


def usable_for_resume(
    s: CheckpointSet,
    group: str,
    required: Iterable[tuple[str, str]] = (),
    verified: Callable[[CheckpointSet], bool] | None = None,
) -> str | None:
    """None when resume of `group` may start from `s` (complete, consistent, with a trainer
    file and every `(model name, role)` of `required`, every checksum matching), else why not.
    Checksums are read unless `verified(s)` vouches for them (a set its writer just wrote)."""
    reason = _unusable_reason(s, group, list(required))
    if reason is None and not (verified is not None and verified(s)):
        reason = checksum_problems(s)
    return reason


def resume_choices(
    sets: Iterable[CheckpointSet], group: str, verified: Callable[[CheckpointSet], bool] | None = None
) -> list[CheckpointSet]:
    """Every set a resume of `group` without a tag may pick, whatever files it requires: the
    newest usable set (what `select_resume_set` picks with nothing required), then each older
    usable one up to the newest usable set holding every `(model, role)` file any resumable set
    of the group holds (what it picks when every model and optimizer is required). Empty when
    the group has no usable set. What retention never deletes."""
    candidates = resume_order(s for s in sets if s.group == group)
    with_trainer = [s for s in candidates if s.ok and s.file(group, "trainer") is not None]
    every = {(i.model_name, i.role) for s in with_trainer for i in s.files.values()}
    choices = []
    for s in with_trainer:
        if usable_for_resume(s, group, verified=verified) is None:
            choices.append(s)
            if every <= {(i.model_name, i.role) for i in s.files.values()}:
                break
    return choices


def _unusable_reason(s: CheckpointSet, group: str, required: list[tuple[str, str]]) -> str | None:
    if not s.ok:
        return problems_text(s.problems)
    if s.file(group, "trainer") is None:
        return "no trainer file (weights only, cannot resume training state)"
    missing = [f"{n} {k}" for n, k in required if s.file(n, k) is None]
    if missing:
        return "missing " + ", ".join(missing)
    return None
