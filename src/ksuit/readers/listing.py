"""Listing the checkpoints of a run from file names (and manifests), without loading tensors.

Everything goes through the run folder's storage backend, so a run may live on any medium. Only
regular files are checkpoints, and sharded checkpoints (`..._model.dcp/`), which are real
folders of part files (their size: the sum of their parts): an entry with a checkpoint or
manifest name that is a symbolic
link (wherever it points, inside the folder or out), a FIFO, a device or a folder is never
followed, opened or stat'ed through; `folder_problems` reports it instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ksuit.layout import (
    CheckpointName,
    is_foreign_filename,
    is_sharded_filename,
    parse_checkpoint_filename,
    parse_manifest_filename,
)
from ksuit.storage import Backend, Entry, Location, open_backend
from ksuit.storage.errors import CorruptCheckpointError, UnsafeCheckpointError
from ksuit.storage.manifest import Manifest, read_manifest
from ksuit.utils.training import TrainingIteration

# the role of another framework's checkpoint file (Lightning's `.ckpt`): the whole training state
FOREIGN_ROLE = "checkpoint"


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint file of a run. `path` is a `Path` for local runs and the URL otherwise;
    `ksuit.load_model` and `ksuit.load_file` take either. `role` is `model`, `optim`, `trainer`,
    or `checkpoint` for another framework's file in a set of ksuit's (Lightning's `.ckpt`)."""

    model_name: str
    tag: str
    role: str
    path: Path | str
    size_bytes: int
    training_iteration: TrainingIteration | None
    info: str = ""
    format: str = "torch"

    @property
    def name(self) -> str:
        """The file name."""
        return Path(self.path).name if isinstance(self.path, Path) else self.path.rsplit("/", 1)[-1]

    @property
    def kind(self) -> str:
        """The file's role (`model`, `optim`, `trainer`); the 0.1 name of `role`."""
        return self.role

    @property
    def group(self) -> str:
        return f"{self.model_name}_{self.info}" if self.info else self.model_name


def checkpoint_folder(run_dir: Location | Backend) -> Backend:
    """The backend of a run's checkpoint folder: `run_dir/checkpoints`, or `run_dir` itself if
    it holds checkpoints, or the single `run_dir/<stage>/checkpoints`."""
    if isinstance(run_dir, Backend):
        backend = run_dir
    else:
        if not isinstance(run_dir, (str, Path)) or str(run_dir) == "":
            raise TypeError(
                f"run_dir must be a path to a run folder (<output_root>/<run_id>), got {run_dir!r}"
            )
        backend = open_backend(run_dir)
    try:
        folder = _checkpoint_folder(backend)
        folder.entries()  # fails here, with the fix below, when unreadable
        return folder
    except PermissionError as e:
        raise PermissionError(
            e.errno,
            f"cannot read the run folder {backend.location} ({e.filename or backend.location}: permission "
            "denied); run as a user that may read it or fix its permissions (chmod/chown)",
            e.filename,
        ) from e


def find_checkpoint_dir(run_dir: Location | Backend) -> Path | str:
    """The checkpoint folder of a run (see `checkpoint_folder`): a `Path`, or a URL."""
    return checkpoint_folder(run_dir).ref


def _checkpoint_folder(run: Backend) -> Backend:
    where = run.location
    exists_as = run.exists_as()
    if exists_as == "missing":
        raise FileNotFoundError(f"run folder {where} does not exist; pass <output_root>/<run_id>")
    if exists_as == "file":
        raise NotADirectoryError(f"{where} is a file; pass the run folder (<output_root>/<run_id>)")
    folders = run.folders()
    if "checkpoints" in folders:
        return run.child("checkpoints")
    if (
        where.rstrip("/").rsplit("/", 1)[-1] == "checkpoints"
        or any(parse_checkpoint_filename(e.name) or parse_manifest_filename(e.name) for e in run.entries())
        or any(is_sharded_filename(name) for name in folders)
    ):
        return run
    stages = [name for name in folders if _has_checkpoints(run, name)]
    if len(stages) == 1:
        return run.child(stages[0]).child("checkpoints")
    if len(stages) > 1:
        raise ValueError(f"{where} has several stages ({', '.join(stages)}); pass <run_dir>/<stage>")
    raise FileNotFoundError(f"{where} has no checkpoints folder; is it a ksuit run folder?")


def _has_checkpoints(run: Backend, stage: str) -> bool:
    try:
        return "checkpoints" in run.child(stage).folders()
    except OSError:
        return False


@dataclass
class FolderListing:
    """One look at a checkpoint folder: its entries, its readable manifests, and what is wrong."""

    folder: Backend
    entries: dict[str, Entry]
    manifests: dict[str, Manifest]  # {manifest file: manifest}
    unreadable: dict[str, str]  # {manifest file: why it cannot be read}
    sharded: dict[str, int] = field(default_factory=dict)  # {sharded checkpoint folder: bytes}

    @property
    def owner(self) -> dict[str, str]:
        """`{checkpoint file: manifest file listing it}`."""
        return {name: m for m, manifest in self.manifests.items() for name in manifest.files}

    @property
    def irregular(self) -> dict[str, str]:
        """`{name: problem}` for checkpoint or manifest names that are not regular files (or, for a
        sharded checkpoint, not a real folder)."""
        result = {
            name: e.problem
            for name, e in self.entries.items()
            if e.problem is not None and (parse_checkpoint_filename(name) or parse_manifest_filename(name))
        }
        for name, e in self.entries.items():
            if e.problem is None and is_sharded_filename(name):
                result[name] = "is a file where a sharded checkpoint folder belongs"
        return result


def sharded_folders(folder: Backend) -> dict[str, int]:
    """`{name: total bytes}` of the sharded checkpoint folders in `folder` (real folders only)."""
    result = {}
    for name in folder.folders():
        if is_sharded_filename(name):
            try:
                result[name] = sum(e.size for e in folder.child(name).entries() if e.problem is None)
            except OSError:
                result[name] = 0
    return result


def read_folder(folder: Backend) -> FolderListing:
    """Lists `folder` once and reads every manifest in it."""
    entries = {e.name: e for e in folder.entries()}
    manifests: dict[str, Manifest] = {}
    unreadable: dict[str, str] = {}
    for name, entry in entries.items():
        if parse_manifest_filename(name) is None:
            continue
        if entry.problem is not None:
            unreadable[name] = f"refusing to read {folder.file_location(name)}: it {entry.problem}"
            continue
        try:
            manifests[name] = read_manifest(folder, name)
        except (CorruptCheckpointError, UnsafeCheckpointError, OSError) as e:
            unreadable[name] = str(e).splitlines()[0] if str(e) else type(e).__name__
    return FolderListing(folder, entries, manifests, unreadable, sharded_folders(folder))


def folder_problems(run_dir: Location | Backend) -> dict[str, str]:
    """`{file name: problem}` for the checkpoint folder of a run: manifests that cannot be read
    and checkpoint or manifest names that are not regular files."""
    listing = read_folder(checkpoint_folder(run_dir))
    return {**listing.unreadable, **listing.irregular}


def _iteration_of(
    name: CheckpointName, listing: FolderListing, owner: dict[str, str]
) -> TrainingIteration | None:
    it = name.training_iteration
    if it is not None:
        return it
    manifest = listing.manifests.get(owner.get(name.filename, ""))
    entry = manifest.files.get(name.filename) if manifest is not None else None
    if entry is None or not entry.training_iteration:
        return None
    return TrainingIteration.from_dict(entry.training_iteration)


def list_checkpoints(run_dir: Location | Backend) -> list[CheckpointInfo]:
    """Every checkpoint file of a run, sorted by model, iteration and tag.

    The iteration comes from the tag (`E10_U200_S800`) or, for `latest`, `last` and `best_...`,
    from the set's manifest; no tensor is loaded.
    """
    return listed_checkpoints(read_folder(checkpoint_folder(run_dir)))


def listed_checkpoints(listing: FolderListing) -> list[CheckpointInfo]:
    """`list_checkpoints` of a folder already read."""
    owner = listing.owner
    result = []
    found = [(e.name, e.size) for e in listing.entries.values() if e.problem is None]
    for filename, size in found + list(listing.sharded.items()):
        name = parse_checkpoint_filename(filename)
        if name is None or (name.is_sharded and filename not in listing.sharded):
            continue  # a file named like a sharded checkpoint folder is reported, never listed
        result.append(
            CheckpointInfo(
                model_name=name.name,
                tag=name.tag,
                role=name.role,
                path=listing.folder.file_ref(filename),
                size_bytes=size,
                training_iteration=_iteration_of(name, listing, owner),
                info=name.info,
                format=name.format,
            )
        )

    result += _foreign_checkpoints(listing)

    def order(c: CheckpointInfo) -> tuple[object, ...]:
        it = c.training_iteration
        return (
            c.model_name,
            c.info,
            it is None,
            (it.epoch, it.update, it.sample) if it and it.is_fully_specified else (0, 0, 0),
            c.tag,
            c.role,
        )

    return sorted(result, key=order)


def _foreign_checkpoints(listing: FolderListing) -> list[CheckpointInfo]:
    """Other frameworks' checkpoint files (Lightning's `.ckpt`) that a readable manifest lists:
    the set's group and tag name them, their role is `FOREIGN_ROLE`."""
    result = []
    for manifest_name, manifest in listing.manifests.items():
        group, tag = parse_manifest_filename(manifest_name) or (manifest.group, manifest.tag)
        for name, listed in manifest.files.items():
            entry = listing.entries.get(name)
            if not is_foreign_filename(name) or entry is None or entry.problem is not None:
                continue
            iteration = listed.training_iteration
            result.append(
                CheckpointInfo(
                    model_name=group,
                    tag=tag,
                    role=FOREIGN_ROLE,
                    path=listing.folder.file_ref(name),
                    size_bytes=entry.size,
                    training_iteration=TrainingIteration.from_dict(iteration) if iteration else None,
                )
            )
    return result


def irregular_entries(run_dir: Location | Backend) -> dict[str, str]:
    """`{name: problem}` for checkpoint or manifest names in the folder that are not regular files."""
    return read_folder(checkpoint_folder(run_dir)).irregular
