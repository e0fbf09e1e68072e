"""From a location (a path or a URL) to the backend that stores it.

A plain path, a `pathlib.Path` or a `file://` URL is a folder of the local file system
(`ksuit.storage.local.LocalBackend`, O_DIRECT and the journal protocol). Any other URL is a
folder of an object store through fsspec (`ksuit.storage.objectstore`): `s3://bucket/prefix`
(needs s3fs: `pip install 'ksuit[s3]'`), `memory://...`, or any protocol fsspec knows.

Storage options (credentials, endpoint, ...) go to the file system. They come from the
`storage_options` argument, else from `set_storage_options(prefix, options)` (a
`PathProvider(..., storage_options=...)` registers its own when its writer starts, and the
command line's `--storage-option KEY=VALUE` registers them for every URL), else from where
s3fs and botocore look themselves (`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`, `~/.aws`, ...).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ksuit.storage.backend import Backend, Location, RecoveryReport
from ksuit.storage.local import LocalBackend

_OPTIONS: dict[str, dict[str, Any]] = {}
_OPTIONS_LOCK = threading.Lock()


def is_url(location: object) -> bool:
    return isinstance(location, str) and "://" in location


def _scheme(location: str) -> str:
    return location.split("://", 1)[0].lower()


def set_storage_options(prefix: str, options: Mapping[str, Any] | None) -> None:
    """Storage options for every URL that starts with `prefix` ("" for all URLs, e.g.
    `"s3://my-bucket"`); a longer matching prefix wins key by key. None forgets the prefix."""
    if not isinstance(prefix, str):
        raise TypeError(f"a storage options prefix is a URL prefix (str), got {prefix!r}")
    with _OPTIONS_LOCK:
        if options is None:
            _OPTIONS.pop(prefix, None)
        else:
            _OPTIONS[prefix] = dict(options)


def storage_options_for(url: str) -> dict[str, Any]:
    """The registered storage options that apply to `url` (see `set_storage_options`)."""
    merged: dict[str, Any] = {}
    with _OPTIONS_LOCK:
        for prefix in sorted(_OPTIONS, key=len):
            if url.startswith(prefix):
                merged.update(_OPTIONS[prefix])
    return merged


def open_backend(location: Location | Backend, storage_options: Mapping[str, Any] | None = None) -> Backend:
    """The backend of the folder at `location`."""
    if isinstance(location, Backend):
        return location
    if not isinstance(location, (str, os.PathLike)) or str(location) == "":
        raise TypeError(f"a location is a path or URL, got {location!r}")
    if is_url(location):
        text = str(location)
        if _scheme(text) == "file":
            return LocalBackend(text[len("file://") :] or "/")
        from ksuit.storage.objectstore import open_object_backend

        options = storage_options if storage_options is not None else storage_options_for(text)
        return open_object_backend(text.rstrip("/"), options)
    return LocalBackend(Path(location))


def split_file_location(
    location: Location, storage_options: Mapping[str, Any] | None = None
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


def join_location(folder: str | Path, *names: str) -> str | Path:
    """`folder/name/...`: a `Path` for local folders, a URL (joined with '/') for URLs."""
    if is_url(folder):
        return "/".join([str(folder).rstrip("/"), *names])
    return Path(folder).joinpath(*names)


def recover_folder(location: Location | Backend) -> RecoveryReport:
    """Completes or discards an interrupted save in the checkpoint folder at `location`."""
    return open_backend(location).recover()
