"""Converting a weights file between the `torch` (`.th`) and `safetensors` formats.

The file is read with the one safe load function (`weights_only=True`) and written atomically
next to the source (temp name, fsync, rename) by the target format's writer.

The new file is standalone: it never joins a set manifest. A set is what one save wrote; an
exported copy of a rolling `latest` file is stale after the next save, and listing it in the
manifest would leave that set mixed (resume refuses mixed sets). Readers list it as a file of
its own beside the set, and `load_model` loads it like any weights file.
"""

from __future__ import annotations

from pathlib import Path

from ksuit.layout import EXTENSIONS, checkpoint_filename, parse_checkpoint_filename
from ksuit.storage.atomic import write_file_atomic
from ksuit.storage.errors import CorruptCheckpointError
from ksuit.storage.formats import format_of_path, get_format
from ksuit.storage.loading import load_file
from ksuit.storage.manifest import list_manifests, read_manifest
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
        owner = _manifest_listing(target)
        if owner is not None:
            raise ValueError(
                f"{target} belongs to the checkpoint set of {owner.name}, and an export never replaces "
                "a file of a set (the set would no longer match its manifest); pass another --output"
            )
        write_file_atomic(target, lambda sink: fmt.write(payload, sink))
    return target


def _manifest_listing(path: Path) -> Path | None:
    """The manifest beside `path` that lists it, if any (unreadable manifests are skipped)."""
    if not path.parent.is_dir():
        return None
    for manifest_path in list_manifests(path.parent):
        try:
            if path.name in read_manifest(manifest_path).files:
                return manifest_path
        except (CorruptCheckpointError, OSError):
            continue
    return None
