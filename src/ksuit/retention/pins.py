"""Pins: tags a user protects from retention (`ksuit pin RUN_DIR TAG`).

They live in the checkpoint folder as `ksuit-pins.json` (`{"version": 1, "pinned": [tags]}`),
written atomically through the backend (a temporary file renamed into place) under the folder
lock, so a pin survives any crash whole or not at all, and a save or prune in another process
never reads half of it. The name is no checkpoint's: no reader lists it as one. Reading it
trusts nothing: a regular file of at most `MAX_PINS_BYTES`, every tag a valid tag.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from ksuit.layout import PINS_FILENAME, validate_tag
from ksuit.storage import Backend, CorruptCheckpointError, UnsafeCheckpointError
from ksuit.storage.backend import WriteStream

PINS_VERSION = 1
MAX_PINS = 10_000
MAX_PINS_BYTES = 1 << 20


def read_pins(folder: Backend) -> set[str]:
    """The pinned tags of a checkpoint folder (none when it has no pins file).

    Raises `CorruptCheckpointError` naming the file when it is not a valid pins file: retention
    then deletes nothing rather than guess."""
    where = folder.file_location(PINS_FILENAME)
    try:
        doc = json.loads(folder.read_small(PINS_FILENAME, MAX_PINS_BYTES, "pins file"))
    except (FileNotFoundError, NotADirectoryError):
        return set()
    except (UnsafeCheckpointError, ValueError, OSError) as e:
        raise _corrupt(where, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    if (
        not isinstance(doc, dict)
        or doc.get("version") != PINS_VERSION
        or not isinstance(doc.get("pinned"), list)
    ):
        raise _corrupt(where, f"not a version {PINS_VERSION} pins file")
    tags = doc["pinned"]
    if len(tags) > MAX_PINS:
        raise _corrupt(where, f"{len(tags)} tags, more than {MAX_PINS}")
    for tag in tags:
        try:
            validate_tag(tag)
        except (TypeError, ValueError) as e:
            raise _corrupt(where, f"holds a bad tag: {e}") from None
    return set(tags)


def write_pins(folder: Backend, tags: Iterable[str]) -> None:
    """Replaces the pins file atomically (the caller holds the folder lock)."""
    tags = sorted({validate_tag(t) for t in tags})
    if len(tags) > MAX_PINS:
        raise ValueError(f"at most {MAX_PINS} tags can be pinned")
    data = json.dumps({"version": PINS_VERSION, "pinned": tags}, indent=1).encode()

    def write(out: WriteStream) -> None:
        out.write(data)

    folder.write_file(PINS_FILENAME, write, len(data))


def _corrupt(where: str, problem: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"pins file {where} cannot be read ({problem}); retention deletes nothing until it is fixed: "
        "delete it (and pin again with `ksuit pin`) if ksuit did not write it"
    )
