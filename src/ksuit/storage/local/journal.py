"""The journal of a set switch or set delete: what it records, how it is encoded, and how
recovery reads it.

A journal `.ksuit-journal.<seq>.json` lands (atomically) at the commit point of a save. It
lists, in rename order, every staged file of the save: its temporary name, its final name, its
size and xxh3-64 checksum, and the manifest of the set it belongs to; `seq` is the save's
commit sequence, also stamped into every manifest the save writes.

A *delete journal* (same name, a `delete` record instead of `files`) lands at the commit point
of a set delete (`ksuit.storage.local.deletion`): the manifest of the set, the commit sequence
that manifest carries, and every file it lists with size and checksum.

Recovery treats a journal as untrusted input (anyone who can write the folder can plant one):
it is read only if it is a regular file (never through a symlink) of at most
`MAX_JOURNAL_BYTES`, and every entry must name plain files inside the folder, the temporary
name following ksuit's temp grammar for its final name (`.<final>.<8 hex>.tmp`); a delete
journal may only name a manifest and checkpoint files of that manifest's tag, each once.
Anything else is refused with an error naming the journal, before recovery acts on any journal.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from ksuit.layout import (
    is_plain_filename,
    journal_sequence,
    parse_checkpoint_filename,
    parse_manifest_filename,
    temp_final_name,
)
from ksuit.storage.errors import CorruptCheckpointError, UnsafeCheckpointError

JOURNAL_VERSION = 2
MAX_JOURNAL_BYTES = 4 << 20  # about 20,000 files; a ksuit save writes a few dozen
_CHECKSUM_RE = re.compile(r"^[0-9a-f]{16}$")


@dataclass(frozen=True)
class JournalEntry:
    """One staged file. `size`/`checksum` are None only in journals of older ksuit versions."""

    temp: str
    final: str
    size: int | None = None
    checksum: str | None = None
    manifest: str | None = None  # the manifest of the set this file belongs to (None: standalone)


@dataclass(frozen=True)
class DeletedFile:
    """One file of a set being deleted, as its manifest recorded it."""

    name: str
    size: int
    checksum: str


@dataclass(frozen=True)
class DeleteRecord:
    """A set delete: its manifest, the commit sequence that manifest carried (0: none), and
    the files it listed."""

    manifest: str
    commit_sequence: int
    files: tuple[DeletedFile, ...]


@dataclass(frozen=True)
class Journal:
    path: Path
    sequence: int
    entries: tuple[JournalEntry, ...]
    legacy: bool = False  # version 1: renames only, no sizes, checksums or manifests
    delete: DeleteRecord | None = None  # a delete journal: no entries, this record

    @property
    def name(self) -> str:
        return self.path.name

    def manifests(self) -> set[str]:
        return {e.manifest for e in self.entries if e.manifest is not None}


def encode_journal(sequence: int, entries: list[JournalEntry]) -> bytes:
    files = [
        {"temp": e.temp, "final": e.final, "size": e.size, "checksum": e.checksum, "manifest": e.manifest}
        for e in entries
    ]
    return json.dumps({"version": JOURNAL_VERSION, "sequence": sequence, "files": files}).encode()


def encode_delete_journal(sequence: int, record: DeleteRecord) -> bytes:
    files = [{"name": f.name, "size": f.size, "checksum": f.checksum} for f in record.files]
    delete = {"manifest": record.manifest, "commit_sequence": record.commit_sequence, "files": files}
    return json.dumps({"version": JOURNAL_VERSION, "sequence": sequence, "delete": delete}).encode()


def read_journal(path: Path) -> Journal:
    """The validated journal at `path`; raises `UnsafeCheckpointError` (not a regular file, a
    name outside the folder or off ksuit's grammar) or `CorruptCheckpointError` (too large, not
    a ksuit journal), naming the journal. Never follows a symlink."""
    sequence = journal_sequence(path.name)
    if sequence is None:
        raise CorruptCheckpointError(f"{path} is not named like a ksuit journal")
    data = _read_small_regular_file(path)
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:  # written atomically: this is outside damage
        raise _corrupt(path, f"is not valid JSON ({e})") from e
    if isinstance(doc, dict) and "renames" in doc and "version" not in doc:
        return Journal(path, sequence, _legacy_entries(path, doc["renames"]), legacy=True)
    if not isinstance(doc, dict) or doc.get("version") != JOURNAL_VERSION:
        raise _corrupt(path, f"is not a version {JOURNAL_VERSION} ksuit journal")
    if doc.get("sequence") != sequence:
        raise _corrupt(path, f"records sequence {doc.get('sequence')!r}, its name says {sequence}")
    if "delete" in doc:
        if "files" in doc:
            raise _corrupt(path, "records both a save and a delete")
        return Journal(path, sequence, (), delete=_delete_record(path, doc["delete"]))
    files = doc.get("files")
    if not isinstance(files, list):
        raise _corrupt(path, "has no list of files")
    entries = tuple(_entry(path, item) for item in files)
    _check_unique(path, entries)
    return Journal(path, sequence, entries)


def _read_small_regular_file(path: Path) -> bytes:
    try:
        st = os.lstat(path)
    except FileNotFoundError as e:
        raise CorruptCheckpointError(f"journal {path} vanished while recovery read it") from e
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeCheckpointError(
            f"journal {path} is not a regular file (a symlink, folder or device); recovery does not "
            "follow it and changes nothing: remove it if ksuit did not write it"
        )
    if st.st_size > MAX_JOURNAL_BYTES:
        raise _corrupt(path, f"is {st.st_size} bytes, more than any ksuit journal ({MAX_JOURNAL_BYTES})")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafeCheckpointError(f"journal {path} is not a regular file; recovery changes nothing")
        chunks, total = [], 0
        while total <= MAX_JOURNAL_BYTES:
            chunk = os.read(fd, MAX_JOURNAL_BYTES + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    finally:
        os.close(fd)
    if total > MAX_JOURNAL_BYTES:
        raise _corrupt(path, f"grew past {MAX_JOURNAL_BYTES} bytes while recovery read it")
    return b"".join(chunks)


def _corrupt(path: Path, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"journal {path} {what}; recovery changes nothing. Delete the journal to discard the save "
        "it records (the previous checkpoints stay)"
    )


def _unsafe(path: Path, what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"journal {path} {what}; ksuit never writes such a journal, so recovery refuses it and "
        "changes nothing. Delete the journal if you did not put it there"
    )


def _check_names(path: Path, temp: object, final: object) -> tuple[str, str]:
    if not is_plain_filename(final):
        raise _unsafe(path, f"names {final!r} as a final file, which is not a plain file name in its folder")
    if not isinstance(temp, str) or not isinstance(final, str) or temp_final_name(temp) != final:
        raise _unsafe(path, f"names {temp!r} as the temporary file of {final!r}, off ksuit's temp grammar")
    return temp, final


def _legacy_entries(path: Path, renames: object) -> tuple[JournalEntry, ...]:
    if not isinstance(renames, list):
        raise _corrupt(path, "has no list of renames")
    entries = []
    for pair in renames:
        if not isinstance(pair, list) or len(pair) != 2:
            raise _corrupt(path, f"has a rename that is not a [temporary, final] pair: {pair!r}")
        entries.append(JournalEntry(*_check_names(path, pair[0], pair[1])))
    result = tuple(entries)
    _check_unique(path, result)
    return result


def _entry(path: Path, item: object) -> JournalEntry:
    if not isinstance(item, dict):
        raise _corrupt(path, f"has an entry that is not an object: {item!r}")
    temp, final = _check_names(path, item.get("temp"), item.get("final"))
    size, checksum, manifest = item.get("size"), item.get("checksum"), item.get("manifest")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _corrupt(path, f"records size {size!r} for {final!r}")
    if not isinstance(checksum, str) or not _CHECKSUM_RE.match(checksum):
        raise _corrupt(path, f"records checksum {checksum!r} for {final!r}")
    if manifest is not None and not (is_plain_filename(manifest) and parse_manifest_filename(manifest)):
        raise _unsafe(path, f"names {manifest!r} as the manifest of {final!r}, which is not a manifest name")
    return JournalEntry(temp, final, size, checksum, manifest)


def _check_unique(path: Path, entries: tuple[JournalEntry, ...]) -> None:
    finals = [e.final for e in entries]
    temps = [e.temp for e in entries]
    if len(set(finals)) != len(finals) or len(set(temps)) != len(temps):
        raise _corrupt(path, "names a file twice")


def _delete_record(path: Path, item: object) -> DeleteRecord:
    if not isinstance(item, dict):
        raise _corrupt(path, f"has a delete record that is not an object: {str(item)[:200]!r}")
    manifest, sequence, files = item.get("manifest"), item.get("commit_sequence"), item.get("files")
    parsed = (
        parse_manifest_filename(manifest)
        if isinstance(manifest, str) and is_plain_filename(manifest)
        else None
    )
    if parsed is None or not isinstance(manifest, str):
        raise _unsafe(path, f"deletes {str(manifest)[:200]!r} as a manifest, which is not a manifest name")
    if not isinstance(sequence, int) or isinstance(sequence, bool) or sequence < 0:
        raise _corrupt(path, f"records commit sequence {sequence!r} for {manifest!r}")
    if not isinstance(files, list):
        raise _corrupt(path, "has no list of files to delete")
    tag = parsed[1]
    result = []
    for entry in files:
        if not isinstance(entry, dict):
            raise _corrupt(path, f"has a file to delete that is not an object: {str(entry)[:200]!r}")
        name, size, checksum = entry.get("name"), entry.get("size"), entry.get("checksum")
        checkpoint = (
            parse_checkpoint_filename(name) if isinstance(name, str) and is_plain_filename(name) else None
        )
        if checkpoint is None or checkpoint.tag != tag or not isinstance(name, str):
            raise _unsafe(
                path, f"deletes {str(name)[:200]!r}, which is not a checkpoint file of the set {manifest!r}"
            )
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise _corrupt(path, f"records size {size!r} for {name!r}")
        if not isinstance(checksum, str) or not _CHECKSUM_RE.match(checksum):
            raise _corrupt(path, f"records checksum {checksum!r} for {name!r}")
        result.append(DeletedFile(name, size, checksum))
    if len({f.name for f in result}) != len(result):
        raise _corrupt(path, "names a file twice")
    return DeleteRecord(manifest, sequence, tuple(result))
