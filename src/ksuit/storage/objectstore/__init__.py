"""The object-store backend: checkpoint folders on S3 (`s3://`, through s3fs) or any fsspec file
system (`memory://`, ...), and the commit protocol that gives them the local backend's
guarantees without rename (this docstring is the protocol's authoritative statement).

Guarantees
----------
As on local disk (`ksuit.storage.local`): after a crash at any instant every set (one manifest
and its files) is either its complete previous version or its complete new version; the sets
of one save (e.g. the model's `latest` and the EMA's `latest`, written by one trainer save)
change together; a save that returned is committed; every name ending in `.th` is a whole
torch file that loads with `torch.load(weights_only=True)`. In addition, a second writer on the
same folder (a job still running after it was preempted and restarted) fails loudly with a
`ConcurrentWriterError` naming the folder instead of interleaving its sets with the first.

Layout
------
A checkpoint folder `F` (e.g. `s3://bucket/runs/<run_id>/checkpoints`) holds:

    F/.ksuit/data/<save id>/<file name>   the bytes of one file of one save, never overwritten
    F/.ksuit/data/<save id>/<folder>/<part>
                                          a part of a sharded checkpoint folder of one save
                                          (`..._model.dcp`: each rank's `__<rank>_0.distcp`,
                                          `.metadata`, `ksuit.th`), never overwritten
    F/.ksuit/commits/<save id>.json       the commit record of one save: the manifest of every
                                          set it wrote and, per set, where each file's bytes are
    F/.ksuit/HEAD.json                    the head: each committed set -> the save that holds it
    F/<file name>                         a standalone file (an export, the run's config.yaml)

`<save id>` is `<server time of the save's start, 10 digits>-<12 random hex digits>`. Readers
never see the physical names: the backend lists and opens the *logical* names of the layout
(`F/autoencoder.encoder_cp=latest_model.th`), which it resolves through the head and commit
records, so every reader (list, load, resume, verify, export) works unchanged. A data object
keeps its file name as the last part of its key, so every object ending in `.th` is a torch file.

Protocol
--------
1. **Stage.** A save first reads the head (its ETag, and the server's clock, which names the
   save). Each file streams into `F/.ksuit/data/<save id>/<name>` while it is hashed (xxh3-64):
   in multipart parts of `part_size` bytes, at most `concurrency` parts in memory at once, so
   the extra memory of a save is at most `part_size x concurrency` plus a constant whatever the
   file size. A part that fails is retried (see Faults); a save that fails removes what it
   staged and aborts its multipart uploads (best effort: recovery removes what is left).
   Nothing staged is visible to readers: no head entry names it.
2. **Commit record.** Then the save writes its commit record with a create-only conditional
   write (`If-None-Match: *`): the manifests of all its sets (sizes, checksums, iterations, as
   on local disk) and, for every file of each set, its object (files of a set the save did not
   rewrite keep the object of the previous version). Every object the record names exists.
3. **Head (the commit point).** Finally the head is replaced by compare-and-swap
   (`If-Match: <ETag read in step 1>`), pointing every set of the save at the new save at once
   (one head for the folder, not one pointer per tag: a save's sets may span several groups
   and tags, and one swap makes all of them visible together). The instant that write
   succeeds is the commit point. A save whose swap fails re-reads the head: if another writer
   committed since this writer last did (the head's `owner` changed), or a set this save
   rewrites changed, or a repair collected objects of saves as old as this one, the save fails
   with `ConcurrentWriterError` (the other writer's sets stand); otherwise (another process
   only pruned other sets) it swaps again on the new head. A writer that finds at the start of
   a save that another writer committed since its own last commit fails before writing
   anything. A request that succeeded on the server but whose answer was lost is recognised on
   retry (the record holds the same bytes; the head names this save), never committed twice.
4. **Retire.** Objects no set references any more (the previous `latest`, a pruned set) are
   listed in the head as retired with the time, and deleted by a later save once they have
   been retired for `reader_grace` seconds (readers that resolved the old version meanwhile
   can finish). Deleting a set (`delete_set`, for retention) removes it from the head with one
   swap first, then retires its objects.
5. **Recover.** `recover()` (before a writer's first save, before resume and `ksuit verify`)
   and `ksuit verify --repair` (with `--grace`) remove what no committed set references and
   what no save younger than the grace period (default one hour for `recover`) can still be
   writing: data objects and commit records of uncommitted saves, expired retired objects,
   and unfinished multipart uploads. Before deleting anything, recovery records in the head
   (by compare-and-swap) that saves started before the horizon are collected, so a save still
   in flight from before the horizon cannot commit a set whose objects are gone: it fails at
   step 3. Only keys of ksuit's grammar under `F/.ksuit/` are ever deleted.

Sharded checkpoint folders
--------------------------
A sharded checkpoint (`ksuit.storage.sharded`) is one folder written by several processes. The
coordinator's save reserves the folder key `F/.ksuit/data/<save id>/<folder name>`
(`stage_folder`: new, since the save id is, so no committed folder's objects are ever written
into); every rank uploads its own parts below it (`write_part`: the key is checked against the
grammar, so a rank cannot write outside `F/.ksuit/data/`; part names of the layout grammar;
hashed while streamed; an existing part is never replaced; the object exists whole when the
call returns); once every rank reported its parts, the coordinator lists the folder key and
checks it holds exactly those parts with their sizes (`add_folder`), and the commit record
names the folder key as the folder's object, with the manifest listing every part's size and
checksum. The head swap makes the folder visible with the rest of the set. Readers list it
among the folders and `child(name)` reads its parts (`CommittedFolder`), so loads and `ksuit
verify` compare the parts really there with the manifest. A part lives and dies with its folder
key: retired, collected and deleted with it; the parts of a save that never committed (a kill,
a failure on any rank) are removed by the save itself where it can, else by recovery and `ksuit
verify --repair` like any other uncommitted object, unfinished multipart uploads included.

Readers see only committed sets: everything is resolved through the head. A reader holding
`lock()` sees one head for the whole block (resume selection and `ksuit verify` do), and the
objects of that head stay readable for `reader_grace` seconds after a newer save replaced them.

Conditional writes
------------------
S3 (and moto, which the tests run against) honours `If-None-Match: *` on PUT and on
CompleteMultipartUpload and `If-Match: <etag>` on PUT: the commit record and the head use them
through s3fs's own aiobotocore client (same session, credentials and endpoint as s3fs). Other
fsspec file systems have no conditional writes: there the backend emulates them under a lock
of this process, which is exact for `memory://` (a process-local store) and a single-writer
guarantee elsewhere: two processes saving to one folder at the same instant are not detected,
and the docs say so.

Faults
------
Transient errors (HTTP 500/502/503/504, throttling, timeouts, dropped connections) are retried
with exponential backoff and jitter within `RetryPolicy.max_seconds` per request; permanent
ones (missing or refused credentials, 403, a bucket that does not exist) fail at once with a
`StoreAccessError` naming the URL or bucket and the cause. A save touches the head before it
writes anything, so such errors stop it before any byte is written; ksuit never creates a
bucket. A save that fails leaves the previous committed sets as they were, readable and
resumable.

Modules: `stores` (the small store interface, and any fsspec file system behind it), `s3`
(S3 through s3fs's client: conditional writes, multipart, retries), `retry`, `streams` (the
hashing multipart write stream), `records` (head and commit record formats, validated as
untrusted input), `files` (opened objects), `backend` (the Backend), `commit` (steps 1-4),
`collect` (step 5).
"""

from __future__ import annotations

from ksuit.storage.objectstore.backend import ObjectStoreBackend, open_object_backend
from ksuit.storage.objectstore.retry import RetryPolicy

__all__ = ["ObjectStoreBackend", "RetryPolicy", "open_object_backend"]
