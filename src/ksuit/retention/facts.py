"""What retention knows about a checkpoint folder: every set with what a rule may look at
(iteration, metrics, time) and, for the sets no policy may delete, the guarantee that protects
it; every file with the bytes it takes (hard links once). `gather` reads it through the backend;
everything after it (`ksuit.retention.planner`) is pure.

The guarantees, whatever the policy: sets under a tag that is not a progress tag (`latest`,
`last`, `best_*`, any name) are never candidates; nor are pinned sets (`ksuit pin`), sets
without a readable manifest (not committed, or damaged: left for `ksuit verify`), sets a save in
flight is writing, sets with entries that are not regular files or with exported copies beside
them (deleting the set would leave the copies without one), the newest complete resumable
set and every set resume may pick (`ksuit.readers.resume_choices`, the very logic of
`select_resume_set`), and sets saved at the iteration of one of those (e.g. its EMA weights).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ksuit.layout import LAST, LATEST, manifest_filename, parse_checkpoint_filename, parse_manifest_filename
from ksuit.readers.listing import FolderListing, read_folder
from ksuit.readers.sets import CheckpointSet, resume_choices, sets_of
from ksuit.storage import Backend, PendingFile
from ksuit.storage.sets import file_nbytes
from ksuit.utils.training import TrainingIteration


@dataclass(frozen=True)
class SetFacts:
    """One set of a checkpoint folder, as retention sees it; `manifest` names it."""

    manifest: str
    group: str
    tag: str
    iteration: TrainingIteration | None
    names: tuple[str, ...]  # what deleting it removes: the files it lists that exist, its manifest
    metrics: Mapping[str, float] = field(default_factory=dict)
    saved_ns: int | None = None  # the commit sequence: the time of its save in ns (roughly)
    guarantee: str | None = None  # why no policy may delete it (None: the policy decides)
    committed: bool = True  # it has a readable manifest

    @property
    def progress(self) -> bool:
        return TrainingIteration.is_progress_string(self.tag)

    def age_key(self) -> tuple[int, int, int, int, str]:
        """Sorts oldest first: by training iteration, then by save time."""
        it = self.iteration
        parts = (it.update, it.epoch, it.sample) if it is not None else (None, None, None)
        update, epoch, sample = (-1 if p is None else p for p in parts)
        return (update, epoch, sample, self.saved_ns or 0, self.tag)

    def label(self) -> str:
        return f"{self.group}@{self.tag}"


@dataclass(frozen=True)
class FolderFacts:
    """Every set of a folder, every file's `(file id, size)`, and the free bytes of its disk."""

    location: str
    sets: tuple[SetFacts, ...]
    files: Mapping[str, tuple[str, int]]
    free_bytes: int | None = None

    def usage(self, without: Collection[str] = ()) -> int:
        """Bytes the folder holds (each file id once) once the names `without` are gone."""
        return _unique_bytes(self._ids(without))

    def bytes_of(self, names: Iterable[str]) -> int:
        """Bytes `names` hold, hard links among them once."""
        seen: dict[str, int] = {}
        for name in names:
            if name in self.files:
                file_id, size = self.files[name]
                seen[file_id] = size
        return sum(seen.values())

    def _ids(self, without: Collection[str]) -> Iterable[tuple[str, int]]:
        return ((file_id, size) for name, (file_id, size) in self.files.items() if name not in without)


def _unique_bytes(pairs: Iterable[tuple[str, int]]) -> int:
    return sum(dict(pairs).values())


class Verified:
    """Sets whose checksums are known good without reading them again: written whole by this
    process (`add_written`) or read and checked here once. Keyed by manifest name and commit
    sequence, so a set written again is checked again."""

    def __init__(self) -> None:
        self._known: set[tuple[str, int]] = set()

    def add_written(self, committed: Mapping[str, int]) -> None:
        self._known.update(committed.items())

    def add(self, s: CheckpointSet) -> None:
        if s.manifest is not None:
            self._known.add((s.manifest.filename, s.manifest.commit_sequence or 0))

    def __call__(self, s: CheckpointSet) -> bool:
        return (
            s.manifest is not None and (s.manifest.filename, s.manifest.commit_sequence or 0) in self._known
        )


def gather(
    folder: Backend,
    pinned: Collection[str] = (),
    in_flight: Collection[str] = (),
    verified: Verified | None = None,
    listing: FolderListing | None = None,
) -> FolderFacts:
    """The facts of `folder` (see the module docstring). Reads every manifest; reads the files
    of a set resume may pick unless `verified` vouches for it (and then remembers it)."""
    listing = listing if listing is not None else read_folder(folder)
    sets = sets_of(listing, checksum=False)
    verified = verified if verified is not None else Verified()
    protected = _resume_guarantees(sets, verified)
    files = {
        name: (e.file_id or f"name:{name}", e.size)
        for name, e in listing.entries.items()
        if e.problem is None
    }
    facts = [_facts(s, listing, pinned, in_flight, protected) for s in sets]
    return FolderFacts(folder.location, tuple(facts), files, folder.free_bytes())


def _resume_guarantees(sets: list[CheckpointSet], verified: Verified) -> dict[str, str]:
    protected: dict[str, str] = {}
    iterations: dict[str, tuple[str, str]] = {}  # iteration -> (group, tag) of a resume set at it
    for group in sorted({s.group for s in sets}):
        for i, s in enumerate(resume_choices(sets, group, verified)):
            verified.add(s)
            reason = (
                f"the newest complete resumable set of '{group}': resume picks it"
                if i == 0
                else f"resume of '{group}' picks it when it needs files the newer sets lack"
            )
            protected.setdefault(_manifest_name(s), reason)
            if s.training_iteration is not None:
                iterations.setdefault(str(s.training_iteration), (group, s.tag))
    for s in sets:
        it = s.training_iteration
        name = _manifest_name(s)
        at = iterations.get(str(it)) if it is not None else None
        if name not in protected and at is not None and at[0] != s.group:
            protected[name] = (
                f"saved with the resume set {at[0]}@{at[1]} (same iteration, e.g. its EMA weights)"
            )
    return protected


def _manifest_name(s: CheckpointSet) -> str:
    return s.manifest.filename if s.manifest is not None else manifest_filename(s.group, s.tag)


def _facts(
    s: CheckpointSet,
    listing: FolderListing,
    pinned: Collection[str],
    in_flight: Collection[str],
    protected: Mapping[str, str],
) -> SetFacts:
    name = _manifest_name(s)
    listed = list(s.manifest.files) if s.manifest is not None else list(s.files)
    present = [n for n in listed if n in listing.entries]
    names = (*present, name) if name in listing.entries else tuple(present)
    metrics = dict(s.manifest.metrics or {}) if s.manifest is not None else {}
    saved = s.manifest.commit_sequence if s.manifest is not None else None
    guarantee = _guarantee(s, name, pinned, in_flight, protected)
    committed = s.manifest is not None
    return SetFacts(name, s.group, s.tag, s.training_iteration, names, metrics, saved, guarantee, committed)


def _guarantee(
    s: CheckpointSet,
    name: str,
    pinned: Collection[str],
    in_flight: Collection[str],
    protected: Mapping[str, str],
) -> str | None:
    if s.tag == LATEST:
        return "'latest': the rolling resume point"
    if s.tag == LAST:
        return "'last': the end of training"
    if s.tag.startswith("best_"):
        return f"'{s.tag}': a best-so-far tag"
    if not TrainingIteration.is_progress_string(s.tag):
        return f"'{s.tag}' is not a progress tag; retention keeps named tags"
    if s.tag in pinned:
        return "pinned (`ksuit unpin` releases it)"
    if s.manifest is None:
        return "not committed: no readable manifest (`ksuit verify` reports it)"
    if name in in_flight:
        return "a save in flight is writing it"
    if s.irregular:
        return "has entries that are not regular files (`ksuit verify` reports them)"
    if s.others:
        return "has exported copies beside it (`ksuit export`); move them away to let retention decide"
    return protected.get(name)


MARGIN_BYTES = 4096  # per file, on top of its size last time (and 1%)


def estimate_incoming(files: Sequence[PendingFile], listing: FolderListing) -> int:
    """The bytes a save of `files` adds to the folder while it is written, for the budget: each
    file at the size the same file (model, info, role, format; any tag) had the last time it
    was written, plus 1% and `MARGIN_BYTES`, so steady-state saves are estimated closely even
    for small models; a file never written before at its format's estimate from the tensors;
    files sharing one payload (hard links) once; each manifest like the group's other manifests."""
    known: dict[tuple[str, ...], int] = {}
    for name, entry in listing.entries.items():
        if entry.problem is None and (key := _kind_key(name)) is not None:
            known[key] = max(known.get(key, 0), entry.size)
    total = 0
    payloads: set[tuple[int, str]] = set()
    for f in files:
        if (id(f.payload), f.fmt) in payloads:
            continue
        payloads.add((id(f.payload), f.fmt))
        previous = known.get(_kind_key(f.filename) or ("?",))
        if previous is None:
            total += file_nbytes(f)
        else:
            total += previous + previous // 100 + MARGIN_BYTES
    for manifest in {f.manifest for f in files if f.manifest is not None}:
        total += known.get(_kind_key(manifest) or ("?",), 0) + MARGIN_BYTES
    return total


def _kind_key(name: str) -> tuple[str, ...] | None:
    """What identifies a file across tags: a checkpoint's model, info, role and extension; a
    manifest's group."""
    parsed = parse_checkpoint_filename(name)
    if parsed is not None:
        return ("file", parsed.name, parsed.info, parsed.role, parsed.ext)
    manifest = parse_manifest_filename(name)
    return ("manifest", manifest[0]) if manifest is not None else None
