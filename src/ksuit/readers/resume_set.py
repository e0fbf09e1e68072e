"""Loading the set a resume starts from in one pass: each file is opened once, hashed from the
bytes that are then loaded, and the set is refused if any file differs from its manifest.

How: under the folder lock (a save in flight elsewhere finishes first), the newest usable set is
chosen as `select_resume_set` chooses it, then every file of the set is opened once and hashed
(`OpenedFile.checksum`: for local files through a mapping that leaves the pages in the page
cache) in a helper thread, while the files the caller wants are loaded from the same openings,
memory-mapped (their tensor bytes are read when used: from the page cache, not the disk a
second time); then every hash is compared with its manifest entry. A
file that does not match refuses the whole set with the reason `ksuit verify` gives
(`size ... != ... in manifest`, `checksum ... != ... in manifest`) and the next usable set is
tried, exactly as `select_resume_set` skips it; nothing is handed to the caller before every
file of the chosen set has matched. A sharded checkpoint folder is checked part by part in the
same helper thread and never loaded here: the caller loads it resharded, for the ranks it has
(`ksuit.readers.leaf_loading`). Files of the set the caller does not load (EMA weights, say)
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

from ksuit.layout import is_sharded_filename
from ksuit.models.base import ModelBase
from ksuit.readers.leaf_loading import load_leaf_optimizer, load_leaf_weights
from ksuit.readers.listing import checkpoint_folder
from ksuit.readers.sets import CheckpointSet, choose_set, problems_text
from ksuit.storage import Backend, Location, OpenedFile, load_opened
from ksuit.storage.errors import UnsafeCheckpointError
from ksuit.storage.manifest import ManifestEntry, hash_problem, verify_file
from ksuit.utils.threads import in_background
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
    """Opens every file of `s` once, hashes them in a helper thread while the wanted ones are
    loaded from the same openings (hashing releases the GIL; loading is Python), then compares
    each hash with the manifest; returns the problems by file name. A file that differs from its
    manifest is a problem even if loading it failed; a file that matches and cannot be loaded
    raises that error."""
    assert s.manifest is not None  # a set without one is never usable
    problems: dict[str, str] = {}
    opened: list[tuple[str, ManifestEntry, OpenedFile]] = []
    folders = {n: e for n, e in s.manifest.files.items() if is_sharded_filename(n)}
    try:
        for name, entry in s.manifest.files.items():
            if name in folders:  # checked part by part; loaded (resharded) by the caller
                continue
            try:
                opened.append((name, entry, s.folder.open(name)))
            except FileNotFoundError:
                problems[name] = "missing"
            except UnsafeCheckpointError as e:  # no longer a regular file
                problems[name] = str(e)
        hashes: dict[str, tuple[int, str] | BaseException] = {}
        folder_problems: dict[str, str | None] = {}

        def check_all() -> None:
            _hash_all(opened, hashes)
            for name, entry in folders.items():
                folder_problems[name] = verify_file(s.folder, name, entry, checksum=True)

        wait_for_hashes = in_background(check_all, "ksuit-resume-hash")
        errors: dict[str, BaseException] = {}
        if not problems:
            for name, _, f in opened:
                info = s.files.get(name)
                key = (info.model_name, info.role) if info is not None else None
                if key in wanted:
                    try:
                        payloads[key] = load_opened(f, map_location, mmap=True)
                    except Exception as e:  # raised below unless the file differs from its manifest
                        errors[name] = e
        wait_for_hashes()
        problems.update({n: p for n, p in folder_problems.items() if p is not None})
        for name, entry, _ in opened:
            hashed = hashes[name]
            if isinstance(hashed, BaseException):
                raise hashed
            problem = hash_problem(*hashed, entry)
            if problem is not None:
                problems[name] = problem
        if not problems and errors:
            raise next(iter(errors.values()))
    finally:
        for _, _, f in opened:
            f.close()
    return problems


def _hash_all(opened: list[tuple[str, ManifestEntry, OpenedFile]], out: dict[str, Any]) -> None:
    for name, _, f in opened:
        try:
            out[name] = f.checksum()
        except BaseException as e:  # raised on the caller's thread
            out[name] = e


def resume_files(model: ModelBase) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """`(required, load)` for resuming `model` with `load_resume_set`: a set must hold the weights
    of every leaf that trains and the state of every optimizer; loaded are those, the weights of
    frozen leaves where the set has them, and the trainer (or loop) state."""
    required: list[tuple[str, str]] = []
    load: list[tuple[str, str]] = [(model.name, "trainer")]
    for name, leaf in model.iter_leaves():
        load.append((name, "model"))
        if not leaf.is_frozen:
            required.append((name, "model"))
        if leaf.optimizer is not None:
            required.append((name, "optim"))
            load.append((name, "optim"))
    return required, load


def restore_leaves(model: ModelBase, loaded: LoadedSet) -> list[str]:
    """Loads the weights and optimizer state of every leaf of `model` from the set `loaded`
    (chosen with `resume_files(model)`): a file from the payload loaded with it, a sharded
    folder resharded for this run's ranks. Returns the leaves the set has no weights of (frozen
    ones, which keep their current weights)."""
    chosen, payloads = loaded.chosen, loaded.payloads
    kept = []
    for name, leaf in model.iter_leaves():
        weights = chosen.file(name, "model")
        if weights is None:
            kept.append(name)
        else:
            load_leaf_weights(leaf, weights.path, payloads.get((name, "model")))
        if leaf.optimizer is not None:
            optim = chosen.file(name, "optim")
            if optim is None:  # never for a set chosen with resume_files' required files
                raise FileNotFoundError(f"the set '{chosen.tag}' has no optimizer state of {name}")
            load_leaf_optimizer(leaf, optim.path, payloads.get((name, "optim")))
    return kept
