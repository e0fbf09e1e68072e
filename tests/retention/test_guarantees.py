"""Retention's guarantees on a real folder, each one a test: whatever the policy, it never
deletes the newest complete resumable set, the set resume would pick, `latest`, `last`, `best_*`
or other named tags, pinned sets, sets that are not committed, or sets a queued asynchronous
save still writes; and it deletes only after the new set committed."""

from __future__ import annotations

import json
import threading

import pytest

import ksuit.storage.sets as sets_module
from ksuit.readers import select_resume_set
from ksuit.retention import KeepBest, RetentionPolicy, pin, prune, unpin
from ksuit.storage import LocalBackend
from tests.retention.helpers import GROUP, Saver, progress_tags, resume_tag, tags

KEEP_ONE = RetentionPolicy(keep_last=1)


def test_deletion_happens_only_after_the_new_set_is_committed(tmp_path, monkeypatch):
    saver = Saver(tmp_path, KEEP_ONE)
    saver.save()
    deleted_while = []
    real = LocalBackend.delete_set

    def delete_set(self, manifest):
        newest = f"{GROUP}_cp={saver.counter.cur_iteration}.manifest.json"
        deleted_while.append((manifest, (saver.folder / newest).is_file()))
        real(self, manifest)

    monkeypatch.setattr(LocalBackend, "delete_set", delete_set)
    for _ in range(3):
        saver.save()
    assert [m for m, _ in deleted_while] == [
        f"{GROUP}_cp=E0_U1_S4.manifest.json",
        f"{GROUP}_cp=E1_U2_S8.manifest.json",
        f"{GROUP}_cp=E1_U3_S12.manifest.json",
    ]
    assert all(committed for _, committed in deleted_while)
    # a save that fails before its commit deletes nothing
    monkeypatch.setattr(
        sets_module, "_updated_manifests", lambda *a: (_ for _ in ()).throw(OSError("disk gone"))
    )
    with pytest.raises(OSError, match="disk gone"):
        saver.save()
    assert len(deleted_while) == 3 and progress_tags(saver.run_dir) == ["E2_U4_S16"]


def test_the_newest_complete_resumable_set_is_never_deleted(tmp_path):
    """No `latest`; weights-only sets after the last resumable one: keep_last 1 keeps the newest
    set and the guarantee keeps the resumable one."""
    saver = Saver(tmp_path, KEEP_ONE)
    saver.save(latest=False)
    resumable = saver.save(latest=False)
    for _ in range(3):
        saver.save(latest=False, resumable=False)
    assert progress_tags(saver.run_dir) == [resumable, "E2_U5_S20"]
    assert resume_tag(saver.run_dir) == resumable
    decided = prune(saver.run_dir, KEEP_ONE, dry_run=True)
    why = {d.set.tag: d.reasons for d in decided.decisions}
    assert why[resumable] == ("the newest complete resumable set of 'autoencoder': resume picks it",)


def test_the_set_resume_would_pick_is_kept_when_a_newer_one_is_damaged(tmp_path):
    saver = Saver(tmp_path)
    older = saver.save(latest=False)
    damaged = saver.save(latest=False)
    trainer_file = saver.folder / f"{GROUP}_cp={damaged}_trainer.th"
    data = bytearray(trainer_file.read_bytes())
    data[-20] ^= 1
    trainer_file.write_bytes(bytes(data))  # damage the newest resumable set after it was written
    saver.restart(KEEP_ONE)  # a new process: it has not seen these sets written
    newest = saver.save(latest=False, resumable=False)
    # resume skips the damaged set (checksum) and picks the older one: retention kept exactly that
    assert resume_tag(saver.run_dir) == older
    assert progress_tags(saver.run_dir) == [older, newest]


def test_latest_last_best_and_named_tags_are_never_deleted(tmp_path):
    saver = Saver(tmp_path, KEEP_ONE)
    saver.save(tag="warmup-done")
    saver.save()
    saver.save(tag="best_model.loss.val", resumable=False, latest=False)
    for _ in range(3):
        saver.save()
    saver.save(tag="last")
    assert set(tags(saver.run_dir)) == {"warmup-done", "latest", "best_model.loss.val", "last", "E3_U6_S24"}


def test_pinned_sets_are_kept_until_unpinned(tmp_path):
    saver = Saver(tmp_path, KEEP_ONE)
    saver.save()
    kept = saver.save()
    pin(saver.run_dir, kept)
    for _ in range(2):
        saver.save()
    assert progress_tags(saver.run_dir) == [kept, "E2_U4_S16"]
    saver.restart(KEEP_ONE)  # pins live in the folder: another process sees them
    saver.save()
    assert kept in progress_tags(saver.run_dir)
    unpin(saver.run_dir, kept)
    saver.save()
    assert progress_tags(saver.run_dir) == ["E3_U6_S24"]


def test_sets_that_are_not_committed_are_never_deleted(tmp_path):
    saver = Saver(tmp_path)
    orphan = saver.save()
    (saver.folder / f"{GROUP}_cp={orphan}.manifest.json").unlink()  # files without a manifest
    files = sorted(p.name for p in saver.folder.glob(f"*{orphan}*"))
    saver.restart(KEEP_ONE)
    for _ in range(2):
        saver.save()
    assert sorted(p.name for p in saver.folder.glob(f"*{orphan}*")) == files


def test_a_set_a_queued_asynchronous_save_still_writes_is_not_deleted(tmp_path, monkeypatch):
    """Save U2 is being written while a queued save writes to U1's set again: retention after U2
    (keep_last 1) leaves U1 alone until that save is on disk, and deletes it after the next."""
    saver = Saver(tmp_path, KEEP_ONE, async_save=True, max_pending=2)
    first = saver.save()
    saver.writer.flush()
    gate, inside = threading.Event(), threading.Event()
    real_write = sets_module.SetWriter._write

    def write(self, files, run_id):
        if not gate.is_set():
            inside.set()
            gate.wait(30)
        return real_write(self, files, run_id)

    monkeypatch.setattr(sets_module.SetWriter, "_write", write)
    saver.save()  # U2: its write waits at the gate
    assert inside.wait(30)
    saver.writer.save(saver.model, first, save_optim=False)  # queued behind U2: rewrites U1's weights
    gate.set()
    saver.writer.flush()
    manifest = json.loads((saver.folder / f"{GROUP}_cp={first}.manifest.json").read_text())
    assert len(manifest["files"]) == 5  # the whole set: nothing of it was deleted under the save
    assert first in progress_tags(saver.run_dir)
    saver.save()
    saver.writer.flush()
    assert progress_tags(saver.run_dir) == ["E1_U3_S12"]


def test_metrics_travel_with_sets_and_keep_best_counts_earlier_runs(tmp_path):
    saver = Saver(tmp_path)
    losses = [0.9, 0.3, 0.5, 0.7]
    written = [saver.save(metrics={"loss/val": v, "lr": 1e-3}) for v in losses]
    manifest = json.loads((saver.folder / f"{GROUP}_cp={written[1]}.manifest.json").read_text())
    assert manifest["metrics"] == {"loss/val": 0.3, "lr": 1e-3}
    # a resumed run (a new writer) with keep_best counts the sets its earlier run saved
    saver.restart(RetentionPolicy(keep_last=1, keep_best=KeepBest(metric="loss/val", mode="min", n=1)))
    newest = saver.save(metrics={"loss/val": 0.4})
    assert progress_tags(saver.run_dir) == [written[1], newest]
    chosen, _ = select_resume_set(saver.run_dir, GROUP)
    assert chosen.manifest.metrics == {"loss/val": 0.4}


def test_non_finite_metrics_are_left_out_and_bad_ones_refused(tmp_path, caplog):
    saver = Saver(tmp_path)
    tag = saver.save(metrics={"loss": float("nan"), "acc": 0.5})
    manifest = json.loads((saver.folder / f"{GROUP}_cp={tag}.manifest.json").read_text())
    assert manifest["metrics"] == {"acc": 0.5} and "'loss' is nan" in caplog.text
    for bad, error in (
        ({1: 0.5}, ValueError),
        ({"x": "0.5"}, TypeError),
        ([0.5], TypeError),
        ({"": 1.0}, ValueError),
    ):
        with pytest.raises(error):
            saver.save(metrics=bad)
