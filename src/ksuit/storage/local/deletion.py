"""Deleting a committed set from a local folder, crash-safely (the save protocol is in
`ksuit.storage.local`; this is its counterpart for retention).

1. **Journal.** A delete journal `.ksuit-journal.<seq>.json` records the set's manifest, the
   commit sequence that manifest carries, and every file it lists with size and checksum. It is
   written atomically (temporary name, fsync, rename, folder fsync); the instant its rename lands
   is the commit point of the delete: from then on the delete is finished, never undone.
2. **Invisible.** The manifest is removed first, so no reader ever sees the set half gone (a
   manifest listing a missing file).
3. **Files.** Every file the manifest listed is removed; the folder is fsynced.
4. **Done.** The journal is removed and the folder fsynced.

A crash before the commit point leaves the whole set (and perhaps a temporary file recovery
deletes); a crash after it leaves a journal that recovery (`finish_delete`, run before any save,
resume or `ksuit verify`) completes. Recovery trusts a delete journal no more than a save
journal: it must pass `ksuit.storage.local.journal`'s checks, and then it removes the manifest
only while it still carries the recorded commit sequence (a set written again since is not the
set the delete was for: the journal is dropped, nothing deleted), and a file only while it is a
regular file with the recorded size and checksum that no manifest in the folder lists.
"""

from __future__ import annotations

import functools
import json
import os
import stat
import time
from pathlib import Path

from ksuit.layout import is_sharded_filename, journal_filename, parse_manifest_filename
from ksuit.storage.backend import RecoveryReport, WriteStream, folder_digest
from ksuit.storage.errors import CorruptCheckpointError, UnsafeCheckpointError
from ksuit.storage.local.files import fsync_dir, write_file_atomic
from ksuit.storage.local.folders import folder_parts, is_real_folder, move_aside, remove_folder
from ksuit.storage.local.journal import DeletedFile, DeleteRecord, Journal, encode_delete_journal
from ksuit.storage.local.safe_files import hash_regular_file, read_regular
from ksuit.storage.manifest import MAX_MANIFEST_BYTES, Manifest


def delete_set(folder: Path, manifest_name: str, floor: int) -> None:
    """Deletes the set of `manifest_name` in `folder` by the protocol above. The caller holds
    the folder lock, has completed pending journals, and passes the largest journal sequence
    in the folder (`floor`): the delete journal's sequence is larger."""
    if parse_manifest_filename(manifest_name) is None:
        raise ValueError(f"{manifest_name!r} is not the manifest of a checkpoint set")
    path = folder / manifest_name
    try:
        data = read_regular(path, MAX_MANIFEST_BYTES, "manifest")
    except UnsafeCheckpointError as e:
        raise CorruptCheckpointError(str(e)) from None
    manifest = Manifest.from_json(data, source=str(path))
    files = tuple(DeletedFile(name, e.size, e.checksum) for name, e in manifest.files.items())
    record = DeleteRecord(manifest_name, manifest.commit_sequence or 0, files)
    sequence = max(time.time_ns(), floor + 1)
    journal = folder / journal_filename(sequence)
    write_file_atomic(journal, functools.partial(_write_all, data=encode_delete_journal(sequence, record)))
    try:
        _unlink(path)
        for f in files:
            _unlink(folder / f.name)
        fsync_dir(folder)
        os.unlink(journal)
        fsync_dir(folder)
    except BaseException as e:
        e.add_note(f"this delete committed ({journal}); the next save, resume or `ksuit verify` finishes it")
        raise


def finish_delete(folder: Path, journal: Journal, report: RecoveryReport) -> None:
    """Completes the delete `journal` records (recovery; see the module docstring)."""
    record = journal.delete
    assert record is not None
    manifest = folder / record.manifest
    if os.path.lexists(manifest):
        if _manifest_sequence(manifest) != record.commit_sequence:
            _drop(folder, journal)
            report.discarded.append(
                f"{journal.name}: {record.manifest} was written again after this delete was "
                "recorded; nothing deleted"
            )
            return
        os.unlink(manifest)
        report.deleted.append(record.manifest)
    listed = _listed_names(folder)
    for f in record.files:
        path = folder / f.name
        if not os.path.lexists(path) or f.name in listed:
            continue
        if _intact(path, f.size, f.checksum) is False:
            report.problems.append(
                f"{path} was left: the delete recorded in {journal.name} was for another file of this "
                "name (its size or checksum differs); no manifest lists it, so delete it if it is not yours"
            )
            continue
        _unlink(path)
        report.deleted.append(f.name)
    _drop(folder, journal)


def _intact(path: Path, size: int, checksum: str) -> bool:
    """Whether `path` is the file (or sharded checkpoint folder: its parts' digest) recorded."""
    if is_sharded_filename(path.name) and is_real_folder(path):
        parts = folder_parts(path)
        return not isinstance(parts, str) and folder_digest(parts) == (size, checksum)
    return hash_regular_file(path) == (size, checksum)


def _drop(folder: Path, journal: Journal) -> None:
    fsync_dir(folder)
    os.unlink(journal.path)
    fsync_dir(folder)


def _unlink(path: Path) -> None:
    """Removes a file, or a sharded checkpoint folder (moved aside first, in one step)."""
    if is_sharded_filename(path.name) and is_real_folder(path):
        remove_folder(move_aside(path))  # what it cannot remove, recovery reports later
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _write_all(out: WriteStream, data: bytes) -> None:
    out.write(data)


def _manifest_sequence(path: Path) -> int | None:
    """The commit sequence a manifest carries (0: none); None when it is not a readable regular
    file (then it is not the manifest the delete recorded)."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        doc = json.loads(read_regular(path, MAX_MANIFEST_BYTES, "manifest"))
    except (OSError, ValueError, UnsafeCheckpointError):
        return None
    seq = doc.get("commit_sequence") if isinstance(doc, dict) else None
    if seq is None:
        return 0
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


def _listed_names(folder: Path) -> set[str]:
    """Every file name a readable manifest in `folder` lists (files of live sets)."""
    names: set[str] = set()
    with os.scandir(folder) as entries:
        manifests = [e.name for e in entries if parse_manifest_filename(e.name) is not None]
    for name in manifests:
        try:
            data = read_regular(folder / name, MAX_MANIFEST_BYTES, "manifest")
            names.update(Manifest.from_json(data, source=name).files)
        except (OSError, UnsafeCheckpointError, CorruptCheckpointError):
            continue
    return names
