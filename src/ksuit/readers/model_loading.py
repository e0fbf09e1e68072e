"""Rebuilding a model from one weights file.

A weights file is data, not code: the classes it names (`config_kind`, its model config's
`kind`) are only taken from modules that are already imported or that the caller trusts
(`trusted_modules`), and a file listed in a manifest beside it must match its recorded size and
checksum before it is used.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, cast, overload

import torch

from ksuit.layout import is_sharded_filename, parse_checkpoint_filename, parse_manifest_filename
from ksuit.models.base import ModelBase
from ksuit.models.wrapped import WrappedCompositeConfig, WrappedModel, WrappedModuleConfig, rebuild_error
from ksuit.readers.listing import read_folder
from ksuit.schemas.models import ModelBaseConfig
from ksuit.storage import Backend, Location, OpenedFile, load_opened, split_file_location
from ksuit.storage.errors import CorruptCheckpointError
from ksuit.storage.formats import format_of_path
from ksuit.storage.manifest import ManifestEntry, hash_problem, verify_file
from ksuit.utils.imports import import_path, resolve_kind_from_file, trusted_prefixes
from ksuit.utils.threads import in_background

logger = logging.getLogger(__name__)
T = TypeVar("T")

# ksuit's own modules (e.g. the models of ksuit.zoo) may always be imported to rebuild a model
ALWAYS_TRUSTED_MODULES = ("ksuit",)


def manifest_entry_of(folder: Backend, name: str) -> tuple[str, ManifestEntry] | None:
    """`(manifest file, entry)` of the manifest in `folder` that lists the file `name`, if any.

    An unreadable manifest is skipped with a warning when its tag is the file's, as it cannot
    say what the file should be.
    """
    parsed = parse_checkpoint_filename(name)
    try:
        listing = read_folder(folder)
    except OSError:
        return None  # a folder that cannot be listed has no manifest we could read
    for manifest_name, problem in listing.unreadable.items():
        named = parse_manifest_filename(manifest_name)
        if parsed is None or named is None or named[1] == parsed.tag:
            logger.warning("cannot check %s against %s: %s", name, manifest_name, problem)
    for manifest_name, manifest in listing.manifests.items():
        entry = manifest.files.get(name)
        if entry is not None:
            return manifest_name, entry
    return None


def check_opened(f: OpenedFile, folder: Backend, checksum: bool = True) -> None:
    """Raises `CorruptCheckpointError` when a manifest in the file's folder lists the opened
    file and it does not match its size (and, with `checksum`, its checksum) there. The bytes
    hashed are those of the opened file, the very file that is then loaded."""
    listed = manifest_entry_of(folder, f.name)
    if listed is None:
        return  # a standalone or exported file: nothing says what it should be
    manifest_name, entry = listed
    problem = _size_problem(f, entry)
    if problem is None and checksum:
        problem = hash_problem(*f.checksum(), entry)
    if problem is not None:
        raise _mismatch(f, folder, manifest_name, problem)


def load_checked(f: OpenedFile, folder: Backend, load: Callable[[], T], checksum: bool = True) -> T:
    """`load()` of the opened file `f`, returned only once `f` matched the manifest beside it
    that lists it (as `check_opened`). The file is hashed in a helper thread while `load` reads
    the same opened file, so its bytes come from the disk once and nothing waits for the hash
    but the return. A load that fails on a file that differs from its manifest reports the
    difference (`CorruptCheckpointError`), not the load's error."""
    listed = manifest_entry_of(folder, f.name)
    if listed is None:
        return load()
    manifest_name, entry = listed
    problem = _size_problem(f, entry)
    if problem is not None:
        raise _mismatch(f, folder, manifest_name, problem)
    if not checksum:
        return load()
    hashed: list[tuple[int, str] | BaseException] = []

    def hash_file() -> None:
        try:
            hashed.append(f.checksum())
        except BaseException as e:  # raised on the caller's thread
            hashed.append(e)

    wait_for_hash = in_background(hash_file, "ksuit-load-hash")
    error: Exception | None = None
    try:
        result: T | None = load()
    except Exception as e:  # raised below unless the file differs from its manifest
        result, error = None, e
    wait_for_hash()
    digest = hashed[0]
    if isinstance(digest, BaseException):
        raise digest
    problem = hash_problem(*digest, entry)
    if problem is not None:
        raise _mismatch(f, folder, manifest_name, problem) from error
    if error is not None:
        raise error
    return cast(T, result)


def _size_problem(f: OpenedFile, entry: ManifestEntry) -> str | None:
    """`hash_problem` of the opened file's size alone, before any byte of it is read."""
    return hash_problem(f.size, entry.checksum, entry)


def _mismatch(f: OpenedFile, folder: Backend, manifest_name: str, problem: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{f.location} does not match the manifest {manifest_name} that lists it ({problem}): the "
        f"file was damaged or changed after it was saved; run `ksuit verify {folder.location}` (it "
        "also completes an interrupted save) and load another checkpoint, or restore the file from a copy"
    )


def check_sharded(folder: Backend, name: str, checksum: bool = True) -> None:
    """`check_opened` for a sharded checkpoint folder: when a manifest beside it lists it, every
    part must be there with its size (and, with `checksum`, its checksum), and nothing else."""
    listed = manifest_entry_of(folder, name)
    if listed is None:
        return
    manifest_name, entry = listed
    problem = verify_file(folder, name, entry, checksum=checksum)
    if problem is not None:
        raise CorruptCheckpointError(
            f"{folder.file_location(name)} does not match the manifest {manifest_name} that lists it "
            f"({problem}); run `ksuit verify {folder.location}` and load another checkpoint"
        )


def load_payload(path: Location, verify: bool = True) -> Any:
    """The payload of any checkpoint: a file (loaded safely) or a sharded checkpoint folder
    (consolidated on CPU in this process, no process group needed), checked against the
    manifest that lists it."""
    folder, name = split_file_location(path)
    if is_sharded_filename(name):
        from ksuit.storage.sharded.load import load_full

        check_sharded(folder, name, checksum=verify)
        return load_full(folder.child(name))
    with folder.open(name, follow_symlinks=True) as f:
        return load_checked(f, folder, lambda: load_opened(f, map_location="cpu"), checksum=verify)


def load_model_payload(
    path: Location, map_location: Any = "cpu", mmap: bool = False, verify: bool = True
) -> dict[str, Any]:
    """The dict of a weights file, loaded safely (`weights_only=True`).

    When a manifest beside the file lists it, the file must match the manifest's size and, with
    `verify` (the default), its checksum, or `CorruptCheckpointError` names both. The file is
    opened once: what is checked is what is loaded. A sharded checkpoint folder (`.dcp`) is
    consolidated on CPU (`load_payload`).
    """
    folder, name = split_file_location(path)
    if is_sharded_filename(name):
        payload = load_payload(path, verify=verify)
        movable = isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict)
        if movable and map_location is not None and isinstance(map_location, (str, torch.device)):
            payload["state_dict"] = {k: v.to(map_location) for k, v in payload["state_dict"].items()}
        location = folder.file_location(name)
    else:
        with folder.open(name, follow_symlinks=True) as f:
            payload = load_checked(
                f, folder, lambda: load_opened(f, map_location=map_location, mmap=mmap), checksum=verify
            )
        location = f.location
    if not isinstance(payload, dict) or "state_dict" not in payload:
        raise ValueError(
            f"{location} is not a ksuit weights file (no 'state_dict' key); pass a *_model.th file"
        )
    return payload


def build_model_from_payload(
    payload: dict[str, Any], source: str, trusted_modules: str | Iterable[str] | None = None
) -> ModelBase:
    """The model (not yet loaded) described by a weights payload's config keys.

    Both classes are resolved and checked (a `ModelBaseConfig` and a `ModelBase` subclass)
    before anything is instantiated; see `ksuit.utils.imports.resolve_kind_from_file` for which
    modules may be imported.
    """
    if "model_config" not in payload or "config_kind" not in payload:
        raise ValueError(
            f"{source} carries no model_config/config_kind, so the model cannot be rebuilt from it; "
            "build the model yourself and load payload['state_dict']"
        )
    trusted = ALWAYS_TRUSTED_MODULES + trusted_prefixes(trusted_modules)
    raw_config = payload["model_config"]
    if not isinstance(raw_config, dict):
        raise ValueError(
            f"{source}: model_config is a {type(raw_config).__name__}, not a dict of config fields"
        )
    context = f"cannot rebuild the model of {source}"
    config_cls = resolve_kind_from_file(
        payload["config_kind"], ModelBaseConfig, context, trusted, what="config class (config_kind)"
    )
    model_cls = resolve_kind_from_file(
        raw_config.get("kind"), ModelBase, context, trusted, what="model class (model_config.kind)"
    )
    config = cast(type[ModelBaseConfig], config_cls).model_validate(raw_config)
    if isinstance(config, (WrappedModuleConfig, WrappedCompositeConfig)):
        raise rebuild_error(source, getattr(config, "module_kind", None))
    if config.kind != raw_config.get("kind"):
        raise ValueError(f"{source}: {config_cls.__qualname__} changed the model kind while validating it")
    return model_cls(model_config=config)


M = TypeVar("M", bound=torch.nn.Module)


@overload
def load_model(
    path: Location,
    map_location: Any = "cpu",
    trusted_modules: str | Iterable[str] | None = None,
    verify: bool = True,
    module: None = None,
) -> ModelBase: ...


@overload
def load_model(
    path: Location,
    map_location: Any = "cpu",
    trusted_modules: str | Iterable[str] | None = None,
    verify: bool = True,
    *,
    module: M,
) -> M: ...


def load_model(
    path: Location,
    map_location: Any = "cpu",
    trusted_modules: str | Iterable[str] | None = None,
    verify: bool = True,
    module: torch.nn.Module | None = None,
) -> torch.nn.Module:
    """Rebuilds the model a weights file describes, loads its weights, returns it in eval mode.

    The config class comes from `config_kind`, the model class from the config's `kind`. A
    file does not choose which code runs: those classes must be in modules already imported (or
    in ksuit), or under one of `trusted_modules` (e.g. `["mypkg"]` allows `mypkg.models.Encoder`),
    which are then imported; a `__main__` module never is. A file listed in a manifest beside
    it is checked against it first (size, and with `verify` the checksum).

    With `module`, nothing is rebuilt: the weights load into the module you built (a plain
    `nn.Module` saved through `ksuit.models.wrap`, or any module with the same state dict keys),
    which is returned in eval mode. Files of wrapped plain modules can only be loaded this way.
    """
    trusted_prefixes(trusted_modules)  # a wrong argument fails before any file is read
    if module is not None and not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module you built, got {type(module).__name__}")
    # .th files are memory-mapped and their tensors become the parameters (no second copy) when
    # that gives the same model as copying: same shapes and dtypes, no tied weights
    payload = load_model_payload(path, map_location, mmap=format_of_path(str(path)) == "torch", verify=verify)
    state_dict = payload["state_dict"]
    if module is not None:
        _warn_other_kind(payload, module, str(path))
        module.load_state_dict(state_dict)  # copies: the caller's module keeps its own tensors
        return module.eval()
    model = build_model_from_payload(payload, str(path), trusted_modules)
    model.load_state_dict(state_dict, assign=_can_assign(model, state_dict))
    if map_location is not None and isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model.eval()


def _warn_other_kind(payload: dict[str, Any], module: torch.nn.Module, source: str) -> None:
    """Logs when the file records another class than the module it is loaded into (the state
    dict keys decide whether it fits; this only helps find a mix-up)."""
    config = payload.get("model_config")
    if not isinstance(config, dict):
        return
    recorded = config.get("module_kind", config.get("kind"))
    inner = module.module if isinstance(module, WrappedModel) else module
    own = {import_path(module), import_path(inner)}
    if isinstance(recorded, str) and recorded not in own:
        logger.warning("%s was saved from a %s; loading it into a %s", source, recorded, import_path(inner))


def _can_assign(model: ModelBase, state_dict: dict[str, Any]) -> bool:
    """Whether `load_state_dict(assign=True)` yields the same model as copying would."""
    own = model.state_dict()
    if set(own) != set(state_dict):
        return False  # let the copying path raise its usual missing/unexpected-keys error
    storages = set()
    for key, mine in own.items():
        theirs = state_dict[key]
        if not isinstance(theirs, torch.Tensor) or theirs.shape != mine.shape or theirs.dtype != mine.dtype:
            return False
        ptr = mine.untyped_storage().data_ptr()
        if ptr and ptr in storages:
            return False  # tied weights: assigning would untie them
        storages.add(ptr)
    return True
