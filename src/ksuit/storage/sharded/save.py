"""Writing the sharded checkpoint folders of a set: the payloads' tensors through one DCP save
(every rank its own shards), each skeleton in `ksuit.th` (the coordinator), all as parts of
staged folders.

The set around them (`ksuit.storage.sets.SetWriter`) stages the folders, has the coordinator
call `write_skeleton` and every rank `write_tensors`, and commits the folders' parts with the
rest of the set once every rank's parts are durable.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from ksuit.storage.backend import Backend, StagedFolder, WrittenFile
from ksuit.storage.formats import torch_save
from ksuit.storage.sharded.payload import split_payload
from ksuit.storage.sharded.writer import BackendStorageWriter, folder_key

SKELETON_NAME = "ksuit.th"
SKELETON_FORMAT = "ksuit.sharded"
SKELETON_VERSION = 1


def skeleton_of(payload: Any, role: str | None, world_size: int) -> dict[str, Any]:
    """What `ksuit.th` holds: the payload without its tensors, and where each tensor goes."""
    skeleton, _, paths = split_payload(payload)
    return {
        "format": SKELETON_FORMAT,
        "version": SKELETON_VERSION,
        "role": role,
        "world_size": world_size,
        "payload": skeleton,
        "tensors": paths,
    }


def write_skeleton(backend: Backend, staged: StagedFolder, skeleton: dict[str, Any]) -> WrittenFile:
    """The coordinator's part: `ksuit.th` (weights-only loadable, no tensors)."""
    return backend.write_part(staged, SKELETON_NAME, lambda out: torch_save(skeleton, out), 64 * 1024)


def write_tensors(
    backend: Backend, folders: list[tuple[StagedFolder, Any]], group: dist.ProcessGroup | None
) -> dict[str, list[WrittenFile]]:
    """Writes the tensors of every `(staged folder, payload)` through one DCP save, each rank its
    own shards (a collective of `group`, or of this process alone without torch.distributed);
    returns, on the coordinator, every folder's parts of every rank and its `.metadata`
    (elsewhere: {})."""
    tensors = {}
    for index, (_, payload) in enumerate(folders):
        _, own, _ = split_payload(payload)
        tensors.update({folder_key(index, key): t for key, t in own.items()})
    writer = BackendStorageWriter(backend, [staged for staged, _ in folders])
    no_dist = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings(), plain_errors(group):
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(
            tensors,
            storage_writer=writer,
            planner=DefaultSavePlanner(dedup_save_to_lowest_rank=False),
            process_group=group,
            no_dist=no_dist,
        )
    return writer.parts


@contextlib.contextmanager
def plain_errors(group: dist.ProcessGroup | None) -> Iterator[None]:
    """DCP reports a failure on any rank to every rank as a `CheckpointException`, a
    `BaseException` that `except Exception` does not catch. Raised instead: this rank's own error
    (an `OSError` of a full disk stays one, as in a save of one process), or a RuntimeError
    naming the rank that failed and its error."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as e:
        failures = e.failures
        rank = dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0
        if rank in failures and isinstance(failures[rank][0], Exception):
            own = failures[rank][0]
            own.add_note(f"(on rank {rank} of a sharded checkpoint save or load)")
            raise own from None
        first = min(failures)
        error = failures[first][0]
        raise RuntimeError(
            f"a sharded checkpoint save or load failed on rank {first}: {type(error).__name__}: {error}"
        ) from None
