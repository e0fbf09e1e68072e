"""Lightning's checkpoints through ksuit's storage: `KsuitCheckpointIO`, a `CheckpointIO` plugin.

    trainer = lightning.Trainer(
        plugins=[KsuitCheckpointIO(async_save=True)],
        callbacks=[ModelCheckpoint(save_top_k=2, monitor="val_loss", save_last=True)],
    )

Every `.ckpt` Lightning writes (`ModelCheckpoint`'s top-k and `last`, `trainer.save_checkpoint`)
becomes a ksuit set of one file: the `.ckpt`, in torch's format as Lightning writes it, and its
manifest `lightning_cp=<file name>.manifest.json` (size, xxh3-64 checksum, epoch and step),
switched in together by the folder's storage backend. A crash at any moment leaves the previous
file or the new one, whole and listed, never a torn one, and `ksuit verify` / `ksuit ls` check
the folder. Paths are plain paths or URLs (`ksuit.storage.locations`).

`async_save=True` snapshots the checkpoint's tensors into reused host buffers and writes in a
background thread (`ksuit.storage.AsyncSetWriter`: ordered, bounded by `max_pending`, a failed
write re-raised by the next save, `teardown` or `flush`). `remove_checkpoint` of a file whose
save is still queued waits for that save first, so a removal never races it (the open Lightning
issue #14035 of `AsyncCheckpointIO`, which removes files its thread has yet to write).

Loading verifies the file against its manifest (size and checksum: `CorruptCheckpointError`
naming both when they differ; a file without a manifest, e.g. one `TorchCheckpointIO` wrote,
loads unverified with a warning). It then loads with `weights_only=True`, also when Lightning
passes `weights_only=None` (torch's own default): everything Lightning itself writes loads that
way (weights, optimizer and scheduler states, loops, callbacks, precision state, and
`hyper_parameters` of plain values). What does not: hyper-parameters or `on_save_checkpoint`
additions holding other objects (an OmegaConf config and its type, a Namespace, a dataclass, an
enum, a `Path`). Those files are refused with `UnsafeCheckpointError` naming the object, and
load only when you ask for it, `trainer.fit(..., weights_only=False)` (then after the checksum
check, so it is the very file this plugin wrote); saving such a checkpoint logs a warning once.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any

from ksuit.integrations._extras import require

require("lightning", "lightning", "ksuit.integrations.lightning")

import torch  # noqa: E402
from lightning.fabric.plugins import CheckpointIO  # noqa: E402

from ksuit.layout import (  # noqa: E402
    is_foreign_filename,
    manifest_filename,
    parse_manifest_filename,
    validate_tag,
)
from ksuit.storage import (  # noqa: E402
    AsyncSetWriter,
    Backend,
    CorruptCheckpointError,
    OpenedFile,
    PendingFile,
    SetSink,
    SetWriter,
    UnsafeCheckpointError,
    load_opened,
    read_manifest,
    split_file_location,
)

logger = logging.getLogger(__name__)

GROUP = "lightning"
"""The group of every Lightning set: its manifest is `lightning_cp=<file name>.manifest.json`."""


def manifest_name(filename: str) -> str:
    """The manifest of the Lightning checkpoint `filename` (a `.ckpt` file name)."""
    if not is_foreign_filename(filename):
        raise ValueError(
            f"KsuitCheckpointIO stores Lightning checkpoints as '<name>.ckpt' files; {filename!r} is not "
            "one: name it with the .ckpt extension (as ModelCheckpoint does)"
        )
    validate_tag(filename)
    name = manifest_filename(GROUP, filename)
    if parse_manifest_filename(name) != (GROUP, filename):
        raise ValueError(
            f"the checkpoint name {filename!r} would not be read back from its manifest; rename it"
        )
    return name


class KsuitCheckpointIO(CheckpointIO):
    """A Lightning `CheckpointIO` writing atomic, checksummed `.ckpt` files through ksuit's
    storage (see the module docstring).

    Args:
        async_save: write in a background thread after snapshotting the tensors.
        max_pending: snapshots that may wait for the disk at once (async only); the next save
            waits for a free one. Host memory: about `max_pending` x the checkpoint, per folder.
        storage_options: options of the storage backend (e.g. for object stores).
    """

    def __init__(
        self, async_save: bool = False, max_pending: int = 1, storage_options: dict[str, Any] | None = None
    ):
        if not isinstance(max_pending, int) or isinstance(max_pending, bool) or max_pending < 1:
            raise ValueError(f"max_pending must be an int >= 1, got {max_pending!r}")
        super().__init__()
        self.async_save = bool(async_save)
        self.max_pending = max_pending
        self.storage_options = storage_options
        self._sinks: dict[str, SetSink] = {}
        self._queued: dict[tuple[str, str], int] = {}  # (folder, file): saves queued, not yet written
        self._lock = threading.Lock()
        self._warned_unplain = False

    # ---- CheckpointIO ------------------------------------------------------------------------
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Writes `checkpoint` to `path` (a `.ckpt` path or URL) as one atomic set with its manifest."""
        if storage_options is not None:
            raise TypeError(
                "KsuitCheckpointIO takes storage options once, KsuitCheckpointIO(storage_options=...), "
                "not per save (trainer.save_checkpoint(..., storage_options=...))"
            )
        if not isinstance(checkpoint, dict):
            raise TypeError(f"a Lightning checkpoint is a dict, got {type(checkpoint).__name__}")
        backend, name = self._locate(path)
        manifest_name(name)
        self._warn_unplain(checkpoint, backend.file_location(name))
        pending = PendingFile(name, checkpoint, "torch", None, GROUP, name, _iteration(checkpoint))
        sink = self._sink(backend)
        if not self.async_save:
            sink.write_set([pending])
            return
        key = (backend.location, name)
        with self._lock:
            self._queued[key] = self._queued.get(key, 0) + 1

        def written(_files: object) -> None:
            self._done(key)

        try:
            sink.write_set([pending], on_written=written)
        except BaseException:
            self._done(key)
            raise

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Loads the checkpoint at `path` after checking it against its manifest; with
        `weights_only=True` unless the caller passes False (see the module docstring)."""
        backend, name = self._locate(path)
        # like TorchCheckpointIO's default: storages on the CPU; Lightning moves them where they belong
        map_location = "cpu" if map_location is None else map_location
        self._flush(backend.location)  # a save of this folder still queued reaches the disk first
        report = backend.recover()  # an interrupted save is completed or discarded before reading
        for problem in report.problems:
            logger.warning("%s", problem)
        with backend.open(name, follow_symlinks=True) as f:
            self._check(f, backend, name)
            if weights_only is False:
                with f.stream() as stream:
                    loaded = torch.load(stream, map_location=map_location, weights_only=False)
            else:
                try:
                    loaded = load_opened(f, map_location=map_location)
                except UnsafeCheckpointError as e:
                    raise UnsafeCheckpointError(
                        f"{str(e).splitlines()[0]}. If you trust it (its checksum matches what this plugin "
                        "wrote), load it fully with trainer.fit(..., weights_only=False)"
                    ) from None
        if not isinstance(loaded, dict):
            raise CorruptCheckpointError(f"{f.location} is not a Lightning checkpoint (not a dict)")
        return loaded

    def remove_checkpoint(self, path: Any) -> None:
        """Removes the checkpoint and its manifest (manifest first: a crash in between leaves a
        whole, unlisted file, never a manifest of a missing one); a save of the same file still
        queued is written first, so it cannot bring the file back afterwards."""
        backend, name = self._locate(path)
        with self._lock:
            queued = self._queued.get((backend.location, name), 0)
        if queued:
            self._flush(backend.location)
        names = [name]
        if is_foreign_filename(name):
            names.insert(0, manifest_filename(GROUP, name))
        backend.delete(names)

    def teardown(self) -> None:
        """Waits for every queued save and stops the background writers; re-raises the first
        failed save (Lightning calls it at the end of fit, validate and test)."""
        sinks, self._sinks = self._sinks, {}
        errors: list[BaseException] = []
        for sink in sinks.values():
            try:
                sink.close()
            except BaseException as e:  # close every writer, then report
                errors.append(e)
        with self._lock:
            self._queued.clear()
        if errors:
            raise errors[0]

    # ---- more ---------------------------------------------------------------------------------
    def flush(self) -> None:
        """Blocks until every queued save is on disk; re-raises a failed one."""
        for location in list(self._sinks):
            self._flush(location)

    # ---- internals ---------------------------------------------------------------------------
    def _locate(self, path: Any) -> tuple[Backend, str]:
        return split_file_location(path, self.storage_options)

    def _sink(self, backend: Backend) -> SetSink:
        sink = self._sinks.get(backend.location)
        if sink is None:
            writer = SetWriter(backend)
            sink = AsyncSetWriter(writer, self.max_pending) if self.async_save else writer
            self._sinks[backend.location] = sink
        return sink

    def _flush(self, location: str) -> None:
        sink = self._sinks.get(location)
        if sink is not None:
            sink.flush()

    def _done(self, key: tuple[str, str]) -> None:
        with self._lock:
            left = self._queued.get(key, 0) - 1
            if left > 0:
                self._queued[key] = left
            else:
                self._queued.pop(key, None)

    def _check(self, f: OpenedFile, backend: Backend, name: str) -> None:
        """Raises `CorruptCheckpointError` when the opened file differs from its manifest."""
        try:
            listed = read_manifest(backend, manifest_name(name)).files.get(name)
        except (FileNotFoundError, ValueError):
            listed = None
        if listed is None:
            logger.warning(
                "%s has no ksuit manifest (it was not written by KsuitCheckpointIO): loading it unverified",
                f.location,
            )
            return
        size, checksum = f.checksum()
        if (size, checksum) != (listed.size, listed.checksum):
            raise CorruptCheckpointError(
                f"{f.location} does not match its manifest {manifest_name(name)} (size {size}, checksum "
                f"{checksum}; the manifest says {listed.size}, {listed.checksum}): the file was damaged or "
                "changed after it was saved; resume from another checkpoint"
            )

    def _warn_unplain(self, checkpoint: dict[str, Any], where: str) -> None:
        if self._warned_unplain:
            return
        found = _first_unplain(checkpoint, "checkpoint")
        if found is not None:
            self._warned_unplain = True
            logger.warning(
                "%s holds %s, which torch.load(weights_only=True) refuses: loading it will need "
                "trainer.fit(..., weights_only=False). Store plain values (dict, list, str, numbers) "
                "to keep it loadable safely",
                where,
                found,
            )


_PLAIN = (str, bytes, int, float, complex, bool, type(None), torch.Size, torch.dtype, torch.device)


def _first_unplain(obj: Any, where: str, depth: int = 0) -> str | None:
    """`'<type> at <where>'` for the first value `weights_only=True` would refuse, else None."""
    if isinstance(obj, torch.Tensor) or isinstance(obj, _PLAIN) or depth > 64:
        return None
    if type(obj) in (dict, OrderedDict):
        for key, value in obj.items():
            found = _first_unplain(key, f"a key of {where}", depth + 1) or _first_unplain(
                value, f"{where}[{key!r}]", depth + 1
            )
            if found:
                return found
        return None
    if type(obj) in (list, tuple, set, frozenset):
        for i, value in enumerate(obj):
            found = _first_unplain(value, f"{where}[{i}]", depth + 1)
            if found:
                return found
        return None
    return f"a {type(obj).__module__}.{type(obj).__qualname__} at {where}"


def _iteration(checkpoint: dict[str, Any]) -> dict[str, int] | None:
    """`{epoch, update}` of a Lightning checkpoint, for its manifest (None when it has none)."""
    epoch, step = checkpoint.get("epoch"), checkpoint.get("global_step")
    if type(epoch) is not int or type(step) is not int or epoch < 0 or step < 0:
        return None
    return {"epoch": epoch, "update": step}


__all__ = ["GROUP", "KsuitCheckpointIO", "manifest_name"]
