"""From a location (a path or a URL) to the backend that stores it.

A plain path, a `pathlib.Path` or a `file://` URL is a folder of the local file system
(`ksuit.storage.local.LocalBackend`). Other URL schemes name object stores; a scheme no backend
handles is an error that says which schemes are known.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ksuit.storage.backend import Backend, Location, RecoveryReport
from ksuit.storage.local import LocalBackend


def is_url(location: object) -> bool:
    return isinstance(location, str) and "://" in location


def _scheme(location: str) -> str:
    return location.split("://", 1)[0].lower()


def open_backend(location: Location | Backend, storage_options: dict[str, Any] | None = None) -> Backend:
    """The backend of the folder at `location`."""
    if isinstance(location, Backend):
        return location
    if not isinstance(location, (str, os.PathLike)) or str(location) == "":
        raise TypeError(f"a location is a path or URL, got {location!r}")
    if is_url(location):
        text = str(location)
        scheme = _scheme(text)
        if scheme == "file":
            return LocalBackend(text[len("file://") :] or "/")
        raise ValueError(
            f"no storage backend for {scheme}:// locations ({text}); ksuit stores checkpoints in local "
            "folders (a path or file:// URL)"
        )
    return LocalBackend(Path(location))


def split_file_location(
    location: Location, storage_options: dict[str, Any] | None = None
) -> tuple[Backend, str]:
    """`(backend of the folder, file name)` of a file's location."""
    if not isinstance(location, (str, os.PathLike)) or str(location) == "":
        raise TypeError(f"a checkpoint file is a path or URL, got {location!r}")
    text = os.fspath(location)
    if is_url(text):
        head, _, name = text.rstrip("/").rpartition("/")
        if not name or head.endswith(":/"):
            raise ValueError(f"{text} names no file")
        return open_backend(head, storage_options), name
    path = Path(text)
    if path.name in ("", ".", ".."):
        raise IsADirectoryError(21, f"{text} is a folder; pass a checkpoint file", text)
    return open_backend(path.parent, storage_options), path.name


def recover_folder(location: Location | Backend) -> RecoveryReport:
    """Completes or discards an interrupted save in the checkpoint folder at `location`."""
    return open_backend(location).recover()
