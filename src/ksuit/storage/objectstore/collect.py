"""Recovery of an object-store folder (step 5 of the protocol in `ksuit.storage.objectstore`):
remove what no committed set references and no save in flight can still be writing.

With grace period `g`, the horizon is the store's clock minus `g`. Removed are: data objects and
commit records of saves that started at or before the horizon and that the head does not
reference, retired objects retired at or before it, and unfinished multipart uploads of saves
that started at or before it. First the head records the horizon (compare-and-swap), so a save
that started before it and is still running fails at its commit instead of committing a set
whose objects are gone; then the objects go. Keys under `.ksuit/` that ksuit does not write are
reported and left alone; younger leftovers are reported as kept. The part objects of a sharded
checkpoint folder live and die with their folder key (what commit records and the head name).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ksuit.storage.backend import RecoveryReport
from ksuit.storage.objectstore.commit import referenced, swap_head
from ksuit.storage.objectstore.records import (
    Head,
    folder_of,
    is_folder_key,
    new_save_id,
    parse_private_key,
    save_time,
)

if TYPE_CHECKING:
    from ksuit.storage.objectstore.backend import HeadState, ObjectStoreBackend


def collect(backend: ObjectStoreBackend, grace: float) -> RecoveryReport:
    report = RecoveryReport()
    state = backend.read_head(fresh=True)
    horizon = int(state.server_time - grace)
    root = backend.path("")
    objects, _ = backend.store.list_folder(backend.private_prefix(), recursive=True)
    uploads = backend.store.list_uploads(backend.private_prefix())
    head = state.head or Head()
    due = {k for k, t in head.retired.items() if t <= horizon}
    alive = referenced(backend, head) - due if state.head is not None else set()

    candidates: list[str] = []
    owner_of: dict[str, str] = {}  # key -> the key the head names for it (a part: its folder's)
    for obj in objects:
        key = obj.path[len(root) :]
        parsed = parse_private_key(key)
        if parsed is None:
            report.problems.append(f"{backend.file_location(key)} was not written by ksuit: left alone")
            continue
        kind, save = parsed
        owner = owner_of[key] = folder_of(key) or key
        if kind == "head" or owner in alive:
            continue
        if owner in due or save_time(save) <= horizon:
            candidates.append(key)
        else:
            report.kept.append(backend.file_location(key))
    stale = []
    for upload in uploads:
        parsed = parse_private_key(upload.path[len(root) :])
        if parsed is not None and parsed[0] == "data" and save_time(parsed[1]) <= horizon:
            stale.append(upload)
        else:
            report.kept.append(f"{backend.store.url(upload.path)} (unfinished upload)")
    if not candidates and not stale:
        return report

    def fence(current: HeadState) -> Head:
        new = current.head.copy() if current.head is not None else Head()
        new.collected_before = max(new.collected_before, horizon)
        new.retired = {k: t for k, t in new.retired.items() if t > horizon}
        return new

    _, new_head, expired = swap_head(
        backend, state, fence, f"collect {new_save_id(state.server_time)}", lambda current: None
    )
    alive = referenced(backend, new_head)
    gone = set(expired)
    doomed = sorted(
        {k for k in candidates if owner_of[k] not in alive}
        | {k for k, owner in owner_of.items() if owner in gone}
        | {k for k in gone if not is_folder_key(k)}  # a folder key is no object: its parts are
    )
    backend.store.delete([backend.path(k) for k in doomed])
    report.removed_temps.extend(backend.file_location(k) for k in doomed)
    for upload in stale:
        backend.store.abort_upload(upload)
        report.discarded.append(f"{backend.store.url(upload.path)}: unfinished multipart upload aborted")
    return report
