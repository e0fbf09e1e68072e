"""Converting a weights file between the `torch` (`.th`) and `safetensors` formats.

The file is read with the one safe load function (`weights_only=True`) and written atomically
next to the source (temp name, fsync, rename) by the target format's writer. When the source is
listed in a set manifest, the new file is added to that manifest with the same iteration, so
`ksuit verify` and resume keep treating the set as complete.
"""

from __future__ import annotations

from pathlib import Path

from ksuit.layout import EXTENSIONS, checkpoint_filename, parse_checkpoint_filename
from ksuit.storage.atomic import write_file_atomic
from ksuit.storage.errors import CorruptCheckpointError
from ksuit.storage.formats import format_of_path, get_format
from ksuit.storage.loading import load_file
from ksuit.storage.manifest import ManifestEntry, list_manifests, read_manifest
from ksuit.storage.transaction import folder_lock


def converted_path(source: Path, to: str) -> Path:
    """Where `source` converted to format `to` goes: same folder, same checkpoint name."""
    get_format(to)
    parsed = parse_checkpoint_filename(source.name)
    if parsed is None:
        return source.with_suffix("." + EXTENSIONS[to])
    return source.with_name(checkpoint_filename(parsed.name, parsed.tag, parsed.kind, parsed.info, fmt=to))


def convert_file(
    source: str | Path, to: str, output: str | Path | None = None, overwrite: bool = False
) -> Path:
    """Writes `source` in format `to` (`"safetensors"` or `"torch"`); returns the new path.

    Tensors keep their exact bits; safetensors stores every non-tensor key as JSON in its
    header, so only weights files (`{state_dict: {name: tensor}, ...plain values}`) convert.
    """
    source = Path(source)
    fmt = get_format(to)
    if not source.is_file():
        raise FileNotFoundError(f"checkpoint file {source} does not exist")
    if format_of_path(source) == to:
        raise ValueError(f"{source} is already in the {to} format")
    target = Path(output) if output is not None else converted_path(source, to)
    if format_of_path(target) != to:
        raise ValueError(f"output {target} must end in .{EXTENSIONS[to]} for the {to} format")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass --force to replace it")
    payload = load_file(source)
    if to == "safetensors":
        fmt.split_payload(payload)  # fails before any byte is written when it cannot convert
    with folder_lock(target.parent):
        size, checksum = write_file_atomic(target, lambda sink: fmt.write(payload, sink))
        if target.parent == source.parent:
            _add_to_manifests(source, target, size, checksum)
    return target


def _add_to_manifests(source: Path, target: Path, size: int, checksum: str) -> None:
    for path in list_manifests(source.parent):
        try:
            manifest = read_manifest(path)
        except CorruptCheckpointError:
            continue
        entry = manifest.files.get(source.name)
        if entry is None:
            continue
        manifest.files[target.name] = ManifestEntry(size, checksum, entry.kind, entry.training_iteration)
        write_file_atomic(path, lambda sink, m=manifest: sink.write(m.to_json().encode()))
