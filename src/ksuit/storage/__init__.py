"""How bytes reach a medium: storage backends (`ksuit.storage.backend`, the local one in
`ksuit.storage.local` with its crash-safety protocol), sets with checksummed manifests, formats,
an asynchronous writer, and the one safe load function."""

from ksuit.storage.async_writer import AsyncSetWriter
from ksuit.storage.backend import (
    Backend,
    Entry,
    Location,
    OpenedFile,
    RecoveryReport,
    SetTransaction,
    WrittenFile,
)
from ksuit.storage.errors import CorruptCheckpointError, UnsafeCheckpointError
from ksuit.storage.folder_manifest import (
    FolderManifest,
    folder_problems,
    read_folder_manifest,
    write_folder_manifest,
)
from ksuit.storage.formats import FORMATS, get_format
from ksuit.storage.loading import load_file, load_opened, read_metadata
from ksuit.storage.local import LocalBackend
from ksuit.storage.locations import open_backend, recover_folder, split_file_location
from ksuit.storage.manifest import Manifest, ManifestEntry, read_manifest, verify_file
from ksuit.storage.sets import PendingFile, SaveHooks, SetSink, SetWriter

__all__ = [
    "FORMATS",
    "AsyncSetWriter",
    "Backend",
    "CorruptCheckpointError",
    "Entry",
    "FolderManifest",
    "LocalBackend",
    "Location",
    "Manifest",
    "ManifestEntry",
    "OpenedFile",
    "PendingFile",
    "RecoveryReport",
    "SaveHooks",
    "SetSink",
    "SetTransaction",
    "SetWriter",
    "UnsafeCheckpointError",
    "WrittenFile",
    "get_format",
    "folder_problems",
    "load_file",
    "load_opened",
    "open_backend",
    "read_folder_manifest",
    "read_manifest",
    "read_metadata",
    "recover_folder",
    "split_file_location",
    "verify_file",
    "write_folder_manifest",
]
