"""Rebuilding a model from one weights file.

A weights file is data, not code: the classes it names (`config_kind`, its model config's
`kind`) are only taken from modules that are already imported or that the caller trusts
(`trusted_modules`), and a file listed in a manifest beside it must match its recorded size and
checksum before it is used.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ksuit.layout import parse_checkpoint_filename, parse_manifest_filename
from ksuit.models.base import ModelBase
from ksuit.schemas.models import ModelBaseConfig
from ksuit.storage.errors import CorruptCheckpointError
from ksuit.storage.formats import format_of_path
from ksuit.storage.loading import load_file
from ksuit.storage.manifest import list_manifests, read_manifest, verify_file
from ksuit.storage.transaction import folder_lock
from ksuit.utils.imports import resolve_kind_from_file, trusted_prefixes

logger = logging.getLogger(__name__)

# ksuit's own modules (e.g. the models of ksuit.zoo) may always be imported to rebuild a model
ALWAYS_TRUSTED_MODULES = ("ksuit",)


def check_against_manifest(path: str | Path, checksum: bool = True) -> None:
    """Raises `CorruptCheckpointError` when a manifest in the file's folder lists the file and
    the file does not match its size (and, with `checksum`, its checksum) there.

    A file no manifest lists (a standalone or exported file) is not checked. An unreadable
    manifest is skipped with a warning, as it cannot say what the file should be.
    """
    path = Path(path)
    folder = path.parent
    parsed = parse_checkpoint_filename(path.name)
    try:
        manifests = list_manifests(folder)
    except OSError:
        return  # a folder that cannot be listed has no manifest we could read; load_file reports the file
    for manifest_path in manifests:
        try:
            manifest = read_manifest(manifest_path)
        except (CorruptCheckpointError, OSError) as e:
            named = parse_manifest_filename(manifest_path.name)
            if parsed is None or named is None or named[1] == parsed.tag:
                logger.warning("cannot check %s against %s: %s", path, manifest_path.name, e)
            continue
        entry = manifest.files.get(path.name)
        if entry is None:
            continue
        problem = verify_file(folder, path.name, entry, checksum=checksum)
        if problem is not None:
            raise CorruptCheckpointError(
                f"{path} does not match the manifest {manifest_path.name} that lists it ({problem}): the "
                f"file was damaged or changed after it was saved; run `ksuit verify {folder}` (it also "
                "completes an interrupted save) and load another checkpoint, or restore the file from a copy"
            )


def load_model_payload(
    path: str | Path, map_location: Any = "cpu", mmap: bool = False, verify: bool = True
) -> dict[str, Any]:
    """The dict of a weights file, loaded safely (`weights_only=True`).

    When a manifest beside the file lists it, the file must match the manifest's size and, with
    `verify` (the default), its checksum, or `CorruptCheckpointError` names both. The folder lock
    is held meanwhile, so a save in flight cannot swap the file between the check and the load.
    """
    path = Path(path)
    with folder_lock(path.parent):
        if path.is_file():
            check_against_manifest(path, checksum=verify)
        payload = load_file(path, map_location=map_location, mmap=mmap)
    if not isinstance(payload, dict) or "state_dict" not in payload:
        raise ValueError(f"{path} is not a ksuit weights file (no 'state_dict' key); pass a *_model.th file")
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
    config = config_cls.model_validate(raw_config)
    if config.kind != raw_config.get("kind"):
        raise ValueError(f"{source}: {config_cls.__qualname__} changed the model kind while validating it")
    return model_cls(model_config=config)


def load_model(
    path: str | Path,
    map_location: Any = "cpu",
    trusted_modules: str | Iterable[str] | None = None,
    verify: bool = True,
) -> ModelBase:
    """Rebuilds the model a weights file describes, loads its weights, returns it in eval mode.

    The config class comes from `config_kind`, the model class from the config's `kind`. A
    file does not choose which code runs: those classes must be in modules already imported (or
    in ksuit), or under one of `trusted_modules` (e.g. `["mypkg"]` allows `mypkg.models.Encoder`),
    which are then imported; a `__main__` module never is. A file listed in a manifest beside
    it is checked against it first (size, and with `verify` the checksum).
    """
    trusted_prefixes(trusted_modules)  # a wrong argument fails before any file is read
    # .th files are memory-mapped and their tensors become the parameters (no second copy) when
    # that gives the same model as copying: same shapes and dtypes, no tied weights
    payload = load_model_payload(path, map_location, mmap=format_of_path(path) == "torch", verify=verify)
    model = build_model_from_payload(payload, str(path), trusted_modules)
    state_dict = payload["state_dict"]
    model.load_state_dict(state_dict, assign=_can_assign(model, state_dict))
    if map_location is not None and isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model.eval()


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
