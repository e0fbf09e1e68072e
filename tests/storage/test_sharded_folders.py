"""Sharded checkpoint folders in a local checkpoint folder: staged whole in a new temporary
folder, switched at the commit (replacing the previous folder of the name), completed or
discarded by recovery after a crash, never written into once committed; hostile leftovers are
handled without following links or descending into foreign folders."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ksuit.layout import is_journal_filename, is_temp_filename, temp_filename
from ksuit.readers import scan_sets
from ksuit.storage import (
    AsyncSetWriter,
    CorruptCheckpointError,
    LocalBackend,
    PendingFile,
    SetWriter,
    open_backend,
    read_manifest,
    verify_file,
)
from ksuit.storage.backend import StagedFolder, folder_digest
from ksuit.storage.local import staging
from ksuit.storage.sharded.load import load_full
from tests.conftest import assert_bitwise_equal
from tests.storage.sharded_sets import MODEL, OPTIM, optim_state, sharded_files, weights, write_sharded_set

MANIFEST = "m_cp=latest.manifest.json"


def names(folder) -> list[str]:
    return sorted(os.listdir(folder))


def test_a_sharded_set_commits_folders_with_every_part_in_the_manifest(tmp_path):
    write_sharded_set(tmp_path)
    assert names(tmp_path) == [MANIFEST, MODEL, OPTIM, "m_cp=latest_trainer.th"]
    assert names(tmp_path / MODEL) == [".metadata", "__0_0.distcp", "ksuit.th"]
    manifest = read_manifest(tmp_path, MANIFEST)
    entry = manifest.files[MODEL]
    assert set(entry.parts) == {".metadata", "__0_0.distcp", "ksuit.th"}
    assert (entry.size, entry.checksum) == folder_digest(entry.parts)
    for name, e in manifest.files.items():
        assert verify_file(tmp_path, name, e) is None, name
    folder = open_backend(tmp_path)
    assert_bitwise_equal(load_full(folder.child(MODEL)), weights())
    assert_bitwise_equal(load_full(folder.child(OPTIM)), optim_state())


def test_a_new_save_replaces_the_folder_and_leaves_no_temporary_folder(tmp_path):
    write_sharded_set(tmp_path, seed=0)
    old_inode = os.stat(tmp_path / MODEL).st_ino
    write_sharded_set(tmp_path, seed=1)
    assert names(tmp_path) == [MANIFEST, MODEL, OPTIM, "m_cp=latest_trainer.th"]
    assert os.stat(tmp_path / MODEL).st_ino != old_inode  # a new folder, never written into
    assert_bitwise_equal(load_full(open_backend(tmp_path).child(MODEL)), weights(1))


def test_a_failed_sharded_save_leaves_the_previous_set(tmp_path, monkeypatch):
    write_sharded_set(tmp_path, seed=0)

    def broken(*args, **kwargs):
        raise OSError(5, "disk error while writing a part")

    monkeypatch.setattr("ksuit.storage.sharded.save.write_skeleton", broken)
    with pytest.raises(OSError, match="disk error"):
        write_sharded_set(tmp_path, seed=1)
    assert names(tmp_path) == [MANIFEST, MODEL, OPTIM, "m_cp=latest_trainer.th"]
    assert_bitwise_equal(load_full(open_backend(tmp_path).child(MODEL)), weights(0))


def committed_but_not_switched(tmp_path, monkeypatch, seed: int = 1) -> None:
    """A save that crashed right after its journal landed (the switch never ran)."""
    monkeypatch.setattr(staging, "_switch", lambda folder, journal, order: None)
    write_sharded_set(tmp_path, seed=seed)
    monkeypatch.undo()


def test_recovery_completes_a_committed_folder_switch(tmp_path, monkeypatch):
    write_sharded_set(tmp_path, seed=0)
    committed_but_not_switched(tmp_path, monkeypatch)
    assert any(is_journal_filename(n) for n in names(tmp_path))
    report = open_backend(tmp_path).recover()
    assert MODEL in report.rolled_forward and OPTIM in report.rolled_forward
    assert not [n for n in names(tmp_path) if is_temp_filename(n) or is_journal_filename(n)]
    assert_bitwise_equal(load_full(open_backend(tmp_path).child(MODEL)), weights(1))
    for name, e in read_manifest(tmp_path, MANIFEST).files.items():
        assert verify_file(tmp_path, name, e) is None, name


def test_recovery_completes_a_switch_cut_between_its_two_renames(tmp_path, monkeypatch):
    write_sharded_set(tmp_path, seed=0)
    committed_but_not_switched(tmp_path, monkeypatch)
    # the crash came after the old folder moved aside and before the new one took its place
    os.rename(tmp_path / MODEL, tmp_path / temp_filename(MODEL, "0badf01d"))
    open_backend(tmp_path).recover()
    assert not [n for n in names(tmp_path) if is_temp_filename(n) or is_journal_filename(n)]
    assert_bitwise_equal(load_full(open_backend(tmp_path).child(MODEL)), weights(1))


def test_recovery_discards_a_save_whose_staged_folder_is_damaged(tmp_path, monkeypatch):
    write_sharded_set(tmp_path, seed=0)
    committed_but_not_switched(tmp_path, monkeypatch)
    staged = next(n for n in names(tmp_path) if is_temp_filename(n) and MODEL in n)
    with open(tmp_path / staged / "__0_0.distcp", "r+b") as f:  # a power cut lost a part's bytes
        f.truncate(10)
    report = open_backend(tmp_path).recover()
    assert report.discarded and not report.rolled_forward
    assert not [n for n in names(tmp_path) if is_temp_filename(n) or is_journal_filename(n)]
    assert_bitwise_equal(load_full(open_backend(tmp_path).child(MODEL)), weights(0))  # the previous set


def test_a_part_is_written_once_and_only_into_a_staged_folder(tmp_path):
    backend = open_backend(tmp_path)
    with backend.begin_set({MODEL: MANIFEST, MANIFEST: MANIFEST}, 1000) as txn:
        staged = txn.stage_folder(MODEL)
        assert MODEL not in names(tmp_path)  # staged under a temporary name, invisible to readers
        part = backend.write_part(staged, "__0_0.distcp", lambda out: out.write(b"abc"))
        assert (part.size, part.name) == (3, "__0_0.distcp")
        with pytest.raises(FileExistsError):
            backend.write_part(staged, "__0_0.distcp", lambda out: out.write(b"other"))
        for bad_part in ("../escape", "a/b", ".", "x.tmp"):
            with pytest.raises(ValueError, match="not a part name"):
                backend.write_part(staged, bad_part, lambda out: out.write(b""))
        with pytest.raises(ValueError, match="not a staged"):
            backend.write_part(StagedFolder(MODEL, "elsewhere"), "p", lambda out: out.write(b""))
        with pytest.raises(RuntimeError, match="ranks wrote"):  # a part the ranks did not report
            txn.add_folder(staged, [])
    assert names(tmp_path) == []  # the block ended without a commit: the staged folder is gone


def test_a_file_in_the_way_of_a_sharded_folder_refuses_the_save_before_writing(tmp_path):
    (tmp_path / MODEL).write_bytes(b"not a folder")
    with pytest.raises(FileExistsError, match="in the way of this sharded checkpoint"):
        write_sharded_set(tmp_path)
    assert names(tmp_path) == [MODEL]


def test_leftover_staged_folders_are_removed_without_following_links(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_bytes(b"keep")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(outside, run / temp_filename(MODEL, "00000001"))  # a link named like a staged folder
    nested = run / temp_filename(OPTIM, "00000002")
    (nested / "sub").mkdir(parents=True)  # ksuit never writes a folder inside a staged one
    plain = run / temp_filename(MODEL, "00000003")
    plain.mkdir()
    (plain / "__0_0.distcp").write_bytes(b"x")
    report = open_backend(run).recover()
    assert (outside / "precious").read_bytes() == b"keep"  # the link went, never its target
    assert not (run / temp_filename(MODEL, "00000001")).exists() and not plain.exists()
    assert (nested / "sub").is_dir() and any("holds the folder 'sub'" in p for p in report.problems)


def test_verify_names_every_problem_of_a_folder(tmp_path):
    write_sharded_set(tmp_path)
    entry = read_manifest(tmp_path, MANIFEST).files[MODEL]
    (tmp_path / MODEL / "extra.bin").write_bytes(b"x")
    assert "extra.bin: not listed in the manifest" in verify_file(tmp_path, MODEL, entry)
    os.unlink(tmp_path / MODEL / "extra.bin")
    part = tmp_path / MODEL / "__0_0.distcp"
    data = bytearray(part.read_bytes())
    data[-30] ^= 1
    part.write_bytes(bytes(data))
    assert "__0_0.distcp: checksum" in verify_file(tmp_path, MODEL, entry)
    assert verify_file(tmp_path, MODEL, entry, checksum=False) is None
    os.unlink(part)
    assert "__0_0.distcp: missing" in verify_file(tmp_path, MODEL, entry)


def test_a_manifest_naming_parts_outside_the_folder_is_refused(tmp_path):
    write_sharded_set(tmp_path)
    doc = json.loads((tmp_path / MANIFEST).read_text())
    doc["files"][MODEL]["parts"]["../../etc/passwd"] = {"size": 1, "checksum": "0" * 16}
    (tmp_path / MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(CorruptCheckpointError, match="not a part name"):
        read_manifest(tmp_path, MANIFEST)


def test_delete_removes_a_sharded_folder(tmp_path):
    write_sharded_set(tmp_path)
    open_backend(tmp_path).delete([MODEL])
    assert MODEL not in names(tmp_path)
    assert not [n for n in names(tmp_path) if is_temp_filename(n)]
    assert torch.load(tmp_path / "m_cp=latest_trainer.th", weights_only=True)["seed"] == 0


def test_a_set_saved_in_another_format_replaces_the_folders(tmp_path):
    # a run saved sharded, resumed in one process: the same tag in `.th` files
    write_sharded_set(tmp_path, seed=0)
    plain = [
        PendingFile(
            f.filename.replace(".dcp", ".th"),
            f.payload,
            "torch",
            f.role,
            f.group,
            f.tag,
            f.training_iteration,
        )
        for f in sharded_files(seed=1)
    ]
    SetWriter(tmp_path).write(plain, run_id="r")
    assert names(tmp_path) == [
        MANIFEST,
        "m_cp=latest_model.th",
        "m_cp=latest_optim.th",
        "m_cp=latest_trainer.th",
    ]
    manifest = read_manifest(tmp_path, MANIFEST)
    assert sorted(manifest.files) == sorted(f.filename for f in plain)
    (s,) = scan_sets(tmp_path, checksum=True)
    assert s.ok, s.problems
    write_sharded_set(tmp_path, seed=2)  # and back
    assert names(tmp_path) == [MANIFEST, MODEL, OPTIM, "m_cp=latest_trainer.th"]
    assert_bitwise_equal(load_full(open_backend(tmp_path).child(MODEL)), weights(2))


def test_an_async_sharded_save_that_fails_is_raised_by_the_next_flush(tmp_path, monkeypatch):
    write_sharded_set(tmp_path, seed=0)
    writer = AsyncSetWriter(SetWriter(tmp_path))
    writer.write_set(sharded_files(seed=1), run_id="r")  # snapshots, then writes in the background
    writer.flush()
    assert_bitwise_equal(load_full(open_backend(tmp_path).child(MODEL)), weights(1))
    original = LocalBackend.write_part

    def failing(self, staged, part, write, expected_nbytes=0):
        if part.endswith(".distcp"):
            raise OSError(28, "No space left on device (injected)")
        return original(self, staged, part, write, expected_nbytes)

    monkeypatch.setattr(LocalBackend, "write_part", failing)
    writer.write_set(sharded_files(seed=2), run_id="r")
    with pytest.raises(OSError, match="No space left on device") as raised:  # the original error
        writer.flush()
    assert raised.value.errno == 28
    monkeypatch.undo()
    writer.close()
    assert names(tmp_path) == [MANIFEST, MODEL, OPTIM, "m_cp=latest_trainer.th"]  # nothing staged is left
    assert_bitwise_equal(load_full(open_backend(tmp_path).child(MODEL)), weights(1))


def test_a_committed_save_whose_staged_folder_holds_a_link_is_discarded(tmp_path, monkeypatch):
    outside = tmp_path / "outside"
    outside.write_bytes(b"precious")
    run = tmp_path / "run"
    write_sharded_set(run, seed=0)
    committed_but_not_switched(run, monkeypatch)
    staged = next(n for n in names(run) if is_temp_filename(n) and MODEL in n)
    os.unlink(run / staged / "__0_0.distcp")
    os.symlink(outside, run / staged / "__0_0.distcp")  # planted: a part that is a link
    report = open_backend(run).recover()
    assert report.discarded and not report.rolled_forward
    assert outside.read_bytes() == b"precious"
    assert not [n for n in names(run) if is_temp_filename(n) or is_journal_filename(n)]
    assert_bitwise_equal(load_full(open_backend(run).child(MODEL)), weights(0))


def test_retention_deletes_a_sharded_set_and_recovery_finishes_an_interrupted_delete(tmp_path, monkeypatch):
    from ksuit.storage.local import deletion

    write_sharded_set(tmp_path)
    open_backend(tmp_path).delete_set(MANIFEST)
    assert names(tmp_path) == []
    write_sharded_set(tmp_path)
    original = deletion._unlink

    def crash_on_the_folder(path):
        if path.name == MODEL:
            raise KeyboardInterrupt  # the process dies after the delete committed
        original(path)

    monkeypatch.setattr(deletion, "_unlink", crash_on_the_folder)
    with pytest.raises(KeyboardInterrupt):
        open_backend(tmp_path).delete_set(MANIFEST)
    monkeypatch.undo()
    assert MODEL in names(tmp_path) and MANIFEST not in names(tmp_path)
    report = open_backend(tmp_path).recover()
    assert MODEL in report.deleted, report
    assert names(tmp_path) == []
