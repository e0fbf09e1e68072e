"""How bytes reach a medium: storage backends (`ksuit.storage.backend`, the local one in
`ksuit.storage.local` and the object-store one in `ksuit.storage.objectstore`, each with its
crash-safety protocol), sets with checksummed manifests, formats,
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
from ksuit.storage.errors import (
    ConcurrentWriterError,
    CorruptCheckpointError,
    StoreAccessError,
    StoreUnavailableError,
    UnsafeCheckpointError,
)
from ksuit.storage.folder_manifest import (
    FolderManifest,
    folder_problems,
    read_folder_manifest,
    write_folder_manifest,
)
from ksuit.storage.formats import FORMATS, get_format
from ksuit.storage.loading import load_file, load_opened, read_metadata
from ksuit.storage.local import LocalBackend
from ksuit.storage.locations import (
    join_location,
    open_backend,
    recover_folder,
    set_storage_options,
    split_file_location,
)
from ksuit.storage.manifest import Manifest, ManifestEntry, read_manifest, verify_file
from ksuit.storage.sets import PendingFile, SaveHooks, SetSink, SetWriter

__all__ = [
    "FORMATS",
    "AsyncSetWriter",
    "Backend",
    "ConcurrentWriterError",
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
    "StoreAccessError",
    "StoreUnavailableError",
    "UnsafeCheckpointError",
    "WrittenFile",
    "get_format",
    "folder_problems",
    "join_location",
    "load_file",
    "load_opened",
    "open_backend",
    "read_folder_manifest",
    "read_manifest",
    "read_metadata",
    "recover_folder",
    "set_storage_options",
    "split_file_location",
    "verify_file",
    "write_folder_manifest",
]
