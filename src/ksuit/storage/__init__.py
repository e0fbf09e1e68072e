"""How bytes reach the medium: atomic files, checksummed manifests, set switches, formats,
an asynchronous queue, and the one safe load function. See `ksuit.storage.atomic` for the
crash-safety protocol."""

from ksuit.storage.async_writer import AsyncSetWriter
from ksuit.storage.atomic import check_free_space, fsync_dir, write_file_atomic
from ksuit.storage.errors import CorruptCheckpointError, UnsafeCheckpointError
from ksuit.storage.formats import FORMATS, get_format
from ksuit.storage.loading import load_file, read_metadata
from ksuit.storage.manifest import Manifest, read_manifest, verify_file
from ksuit.storage.transaction import PendingFile, SetWriter, WrittenFile, recover_folder

__all__ = [
    "FORMATS",
    "AsyncSetWriter",
    "CorruptCheckpointError",
    "Manifest",
    "PendingFile",
    "SetWriter",
    "UnsafeCheckpointError",
    "WrittenFile",
    "check_free_space",
    "fsync_dir",
    "get_format",
    "load_file",
    "read_manifest",
    "read_metadata",
    "recover_folder",
    "verify_file",
    "write_file_atomic",
]
