"""Converting a weights file between the `torch` (`.th`) and `safetensors` formats.

The file is read with the one safe load function (`weights_only=True`) and written atomically
next to the source (or at `output`) through the target folder's backend, by the target
format's writer.

The new file is standalone: it never joins a set manifest. A set is what one save wrote; an
exported copy of a rolling `latest` file is stale after the next save, and listing it in the
manifest would leave that set mixed (resume refuses mixed sets). Readers list it as a file of
its own beside the set, and `load_model` loads it like any weights file.
"""

from __future__ import annotations

import os

from ksuit.layout import (
    EXTENSIONS,
    checkpoint_filename,
    is_sharded_filename,
    parse_checkpoint_filename,
    parse_manifest_filename,
)
from ksuit.storage.backend import Backend, Location, WrittenFile
from ksuit.storage.errors import CorruptCheckpointError
from ksuit.storage.formats import SafetensorsFormat, format_of_path, get_format
from ksuit.storage.loading import load_file
from ksuit.storage.locations import split_file_location
from ksuit.storage.manifest import read_manifest


def converted_name(name: str, to: str) -> str:
    """The name of `name` converted to format `to`: the same checkpoint name, the new extension."""
    get_format(to)
    parsed = parse_checkpoint_filename(name)
    if parsed is None:
        stem = name.rsplit(".", 1)[0] if "." in name else name
        return f"{stem}.{EXTENSIONS[to]}"
    return checkpoint_filename(parsed.name, parsed.tag, parsed.role, parsed.info, fmt=to)


def convert_file(
    source: Location, to: str, output: Location | None = None, overwrite: bool = False
) -> WrittenFile:
    """Writes `source` in format `to` (`"safetensors"` or `"torch"`); returns the new file.

    Tensors keep their exact bits; safetensors stores every non-tensor key as JSON in its
    header, so only weights files (`{state_dict: {name: tensor}, ...plain values}`) convert.
    """
    fmt = get_format(to)
    source_backend, source_name = split_file_location(source)
    sharded = is_sharded_filename(source_name)
    if not sharded and format_of_path(source_name) == to:
        raise ValueError(f"{os.fspath(source)} is already in the {to} format")
    if output is not None:
        backend, name = split_file_location(output)
    else:
        backend, name = source_backend, converted_name(source_name, to)
    where = backend.file_location(name)
    if format_of_path(name) != to:
        raise ValueError(f"output {where} must end in .{EXTENSIONS[to]} for the {to} format")
    if sharded:  # streamed tensor by tensor, never the whole payload in memory
        from ksuit.storage.sharded.consolidate import export_sharded, safetensors_layout

        if isinstance(fmt, SafetensorsFormat):
            safetensors_layout(source_backend.child(source_name))  # fails before anything is written
        with backend.lock():
            _refuse_existing(backend, name, where, overwrite)
        return export_sharded(source_backend.child(source_name), to, backend, name)
    payload = load_file(source)
    if isinstance(fmt, SafetensorsFormat):
        fmt.split_payload(payload)  # fails before any byte is written when it cannot convert
    with backend.lock():
        _refuse_existing(backend, name, where, overwrite)
        return backend.write_file(name, lambda sink: fmt.write(payload, sink), fmt.estimate_nbytes(payload))


def _refuse_existing(backend: Backend, name: str, where: str, overwrite: bool) -> None:
    exists = backend.exists_as() == "folder" and any(e.name == name for e in backend.entries())
    if exists and not overwrite:
        raise FileExistsError(f"{where} already exists; pass --force to replace it")
    owner = _manifest_listing(backend, name) if exists else None
    if owner is not None:
        raise ValueError(
            f"{where} belongs to the checkpoint set of {owner}, and an export never replaces "
            "a file of a set (the set would no longer match its manifest); pass another --output"
        )


def _manifest_listing(backend: Backend, name: str) -> str | None:
    """The manifest of the folder that lists `name`, if any (unreadable manifests are skipped)."""
    for entry in backend.entries():
        if entry.problem is not None or parse_manifest_filename(entry.name) is None:
            continue
        try:
            if name in read_manifest(backend, entry.name).files:
                return entry.name
        except (CorruptCheckpointError, OSError):
            continue
    return None
