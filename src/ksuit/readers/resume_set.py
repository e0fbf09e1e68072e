"""Loading the set a resume starts from in one pass: each file is opened once, hashed from the
bytes that are then loaded, and the set is refused if any file differs from its manifest.

How: under the folder lock (a save in flight elsewhere finishes first), the newest usable set is
chosen as `select_resume_set` chooses it, then every file of the set is opened once and hashed
(`OpenedFile.checksum`: for local files through a mapping that leaves the pages in the page
cache) and compared with its manifest entry; the files the caller wants are then loaded from the
same opened file, memory-mapped, so their bytes are not read from the disk a second time. A
file that does not match refuses the whole set with the reason `ksuit verify` gives
(`size ... != ... in manifest`, `checksum ... != ... in manifest`) and the next usable set is
tried, exactly as `select_resume_set` skips it; nothing is handed to the caller before every
file of the chosen set has matched. Files of the set the caller does not load (EMA weights, say)
are hashed too: a set is used whole or not at all. A file that matches its manifest but cannot be
loaded (refused by the safe loader) raises, as a load always did.

Memory-mapped loading means that tensors a resume does not copy stay backed by their file until
written: `load_state_dict` copies weights into the model, but a CPU optimizer keeps the loaded
state tensors as they are, so each page is read from the page cache when first used and becomes
private memory when the first step writes it (as with `torch.load(mmap=True)`). The mapping keeps
the file's blocks allocated until the process ends, even after a later save replaced the file or
retention deleted it: one optimizer file's worth of disk space per resume.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ksuit.readers.listing import checkpoint_folder
from ksuit.readers.sets import CheckpointSet, choose_set, problems_text
from ksuit.storage import Backend, Location, load_opened
from ksuit.storage.errors import UnsafeCheckpointError
from ksuit.storage.manifest import hash_problem
from ksuit.utils.training import TrainingIteration


@dataclass
class LoadedSet:
    """The chosen set, the payloads of the files asked for, by `(model name, role)`, and the
    `(tag, reason)` of every set skipped."""

    chosen: CheckpointSet
    payloads: dict[tuple[str, str], Any] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def load_resume_set(
    run_dir: Location | Backend,
    group: str,
    tag: str | TrainingIteration | None = None,
    required: Iterable[tuple[str, str]] = (),
    load: Iterable[tuple[str, str]] = (),
    map_location: Any = "cpu",
) -> LoadedSet:
    """The newest complete, consistent, intact set of `group` with a trainer file and every
    `(model name, role)` in `required` (as `select_resume_set`), with the files named in `load`
    that it has loaded (`weights_only=True`, memory-mapped where the medium allows). Raises
    FileNotFoundError, with every set skipped and why, when no set is usable."""
    folder = checkpoint_folder(run_dir)
    wanted = set(load)
    payloads: dict[tuple[str, str], Any] = {}

    def load_whole(s: CheckpointSet) -> str | None:
        payloads.clear()
        problems = _load_checked(s, wanted, map_location, payloads)
        s.checksums_verified = not problems
        if problems:
            s.problems.update(problems)
            payloads.clear()
            return problems_text(problems)
        return None

    with folder.lock():
        chosen, skipped = choose_set(folder, group, tag, list(required), load_whole)
    return LoadedSet(chosen, dict(payloads), skipped)


def _load_checked(
    s: CheckpointSet, wanted: set[tuple[str, str]], map_location: Any, payloads: dict[tuple[str, str], Any]
) -> dict[str, str]:
    """Opens, hashes and (if wanted) loads every file of `s`; returns the problems by file name."""
    assert s.manifest is not None  # a set without one is never usable
    problems: dict[str, str] = {}
    for name, entry in s.manifest.files.items():
        info = s.files.get(name)
        try:
            f = s.folder.open(name)
        except FileNotFoundError:
            problems[name] = "missing"
            continue
        except UnsafeCheckpointError as e:  # no longer a regular file
            problems[name] = str(e)
            continue
        with f:
            problem = hash_problem(*f.checksum(), entry)
            if problem is not None:
                problems[name] = problem
            elif info is not None and (info.model_name, info.role) in wanted and not problems:
                # a file that matches its manifest but cannot be loaded is an error, as always
                payloads[(info.model_name, info.role)] = load_opened(f, map_location, mmap=True)
    return problems
