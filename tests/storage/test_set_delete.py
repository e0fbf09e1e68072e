"""Deleting a committed set crash-safely (`Backend.delete_set`, the local backend's delete
journal) and recovery finishing an interrupted delete; delete journals are as untrusted as save
journals: hostile ones are refused by every entry point and change nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ksuit.cli import app
from ksuit.layout import PINS_FILENAME, journal_filename
from ksuit.readers import scan_sets, select_resume_set
from ksuit.storage import LocalBackend, recover_folder
from ksuit.storage.errors import CorruptCheckpointError, UnsafeCheckpointError
from ksuit.storage.local.journal import DeletedFile, DeleteRecord, encode_delete_journal
from tests.storage.test_journal_safety import GROUP, Run, forget_recovery, leftovers, names, tree

runner = CliRunner()
U1 = "autoencoder_cp=E0_U1_S0.manifest.json"
U1_FILES = [
    "autoencoder.decoder_cp=E0_U1_S0_model.th",
    "autoencoder.decoder_cp=E0_U1_S0_optim.th",
    "autoencoder.encoder_cp=E0_U1_S0_model.th",
    "autoencoder.encoder_cp=E0_U1_S0_optim.th",
    "autoencoder_cp=E0_U1_S0_trainer.th",
]


@pytest.fixture
def run(tmp_path):
    run = Run(tmp_path / "out")
    for _ in range(3):
        run.save()
    return run


def verify_ok(run: Run) -> None:
    result = runner.invoke(app, ["verify", str(run.run_dir)])
    assert result.exit_code == 0, result.output


def u1_gone(run: Run) -> None:
    assert not [n for n in names(run.folder) if "E0_U1_S0" in n], names(run.folder)
    assert leftovers(run.folder) == []
    verify_ok(run)


def test_a_set_is_deleted_manifest_first_and_nothing_else_changes(run, monkeypatch):
    export = run.folder / "autoencoder.encoder_cp=E0_U1_S0_model.safetensors"  # not of the set
    export.write_bytes(b"an export beside the set")
    others = {n: (run.folder / n).read_bytes() for n in names(run.folder) if "E0_U1_S0" not in n}
    unlinked = []
    real = os.unlink
    monkeypatch.setattr(os, "unlink", lambda p, **kw: (unlinked.append(Path(p).name), real(p, **kw))[1])
    LocalBackend(run.folder).delete_set(U1)
    monkeypatch.setattr(os, "unlink", real)
    assert unlinked[0] == U1  # invisible first, then the files, then the journal
    assert sorted(unlinked[1:6]) == U1_FILES and unlinked[6].startswith(".ksuit-journal.")
    assert {n: (run.folder / n).read_bytes() for n in names(run.folder)} == {
        **others,
        export.name: export.read_bytes(),
    }
    assert "E0_U1_S0" not in {s.tag for s in scan_sets(run.run_dir) if s.manifest is not None}


def test_deleting_one_name_of_a_hard_link_keeps_the_other(run):
    u3 = "autoencoder_cp=E0_U3_S0.manifest.json"
    latest = run.folder / "autoencoder_cp=latest_trainer.th"
    assert latest.stat().st_nlink == 2  # U3's trainer file and latest's are one file
    LocalBackend(run.folder).delete_set(u3)
    assert latest.stat().st_nlink == 1
    chosen, skipped = select_resume_set(run.run_dir, GROUP)
    assert (chosen.tag, skipped) == ("latest", [])
    verify_ok(run)


@pytest.mark.parametrize("survived_unlinks", [0, 1, 3])
def test_an_interrupted_delete_is_finished_by_recovery(run, monkeypatch, survived_unlinks):
    """The process dies after the delete journal landed and `survived_unlinks` unlinks."""
    monkeypatch.setattr(os, "unlink", _fail_after(survived_unlinks))
    with pytest.raises(KeyboardInterrupt):
        LocalBackend(run.folder).delete_set(U1)
    monkeypatch.undo()
    assert [n for n in names(run.folder) if n.startswith(".ksuit-journal.")]
    if survived_unlinks:  # no manifest lists a missing file: the set went invisible first
        assert "E0_U1_S0" not in {s.tag for s in scan_sets(run.run_dir) if s.manifest is not None}
    forget_recovery(monkeypatch)
    report = recover_folder(run.folder)
    assert len(report.deleted) == 6 - survived_unlinks and set(report.deleted) <= {U1, *U1_FILES}
    u1_gone(run)


def test_a_delete_journal_is_finished_before_the_next_save(run, monkeypatch):
    monkeypatch.setattr(os, "unlink", _fail_after(1))
    with pytest.raises(KeyboardInterrupt):
        LocalBackend(run.folder).delete_set(U1)
    monkeypatch.undo()
    run.save()  # the writer finds the journal and recovers first
    u1_gone(run)


def _fail_after(n: int):
    real, calls = os.unlink, [0]

    def unlink(path, **kw):
        calls[0] += 1
        if calls[0] > n:
            raise KeyboardInterrupt("killed (injected)")
        real(path, **kw)

    return unlink


def plant_delete(run: Run, record: DeleteRecord | dict, sequence: int = 7) -> Path:
    journal = run.folder / journal_filename(sequence)
    if isinstance(record, DeleteRecord):
        journal.write_bytes(encode_delete_journal(sequence, record))
    else:
        journal.write_text(json.dumps({"version": 2, "sequence": sequence, "delete": record}))
    return journal


def u1_record(run: Run, sequence: int | None = None) -> DeleteRecord:
    doc = json.loads((run.folder / U1).read_text())
    files = tuple(DeletedFile(n, e["size"], e["checksum"]) for n, e in doc["files"].items())
    return DeleteRecord(U1, doc["commit_sequence"] if sequence is None else sequence, files)


def test_a_stale_delete_journal_deletes_nothing(run):
    """A delete journal for a set written again since (another commit sequence): dropped."""
    before = tree(run.folder)
    journal = plant_delete(run, u1_record(run, sequence=12345))
    report = recover_folder(run.folder)
    assert not journal.exists() and report.deleted == []
    assert "written again after this delete was recorded; nothing deleted" in report.discarded[0]
    assert tree(run.folder) == before
    verify_ok(run)


def test_files_a_live_manifest_lists_or_that_changed_are_left(run):
    record = u1_record(run)
    u1 = json.loads((run.folder / U1).read_text())
    (run.folder / U1).unlink()  # the delete got past the manifest ...
    altered = run.folder / U1_FILES[0]
    altered.write_bytes(b"someone else's bytes")  # ... and this file is not the one it recorded
    listed = U1_FILES[1]  # and this one a live manifest lists now
    u2 = run.folder / "autoencoder_cp=E0_U2_S0.manifest.json"
    doc = json.loads(u2.read_text())
    doc["files"][listed] = u1["files"][listed]
    u2.write_text(json.dumps(doc))
    plant_delete(run, record)
    report = recover_folder(run.folder)
    assert altered.exists() and (run.folder / listed).exists()
    assert "was left" in report.problems[0] and U1_FILES[0] in report.problems[0]
    assert sorted(report.deleted) == sorted(U1_FILES[2:])


def hostile_records(run: Run, tmp_path: Path) -> dict[str, dict]:
    good = u1_record(run)
    entry = {"name": U1_FILES[0], "size": good.files[0].size, "checksum": good.files[0].checksum}

    def record(manifest=U1, files=None, sequence=good.commit_sequence):
        return {
            "manifest": manifest,
            "commit_sequence": sequence,
            "files": files if files is not None else [entry],
        }

    outside = os.path.relpath(tmp_path / "outside" / "victim.th", run.folder)
    return {
        "file outside the folder": record(files=[{**entry, "name": outside}]),
        "absolute file": record(files=[{**entry, "name": str(tmp_path / "outside" / "victim.th")}]),
        "manifest outside": record(manifest="../" + U1),
        "not a manifest": record(manifest="autoencoder_cp=E0_U1_S0_trainer.th"),
        "a file of another tag": record(files=[{**entry, "name": "autoencoder_cp=latest_trainer.th"}]),
        "a manifest as a file": record(files=[{**entry, "name": "autoencoder_cp=latest.manifest.json"}]),
        "the pins file": record(files=[{**entry, "name": PINS_FILENAME}]),
        "not a checkpoint name": record(files=[{**entry, "name": "notes.txt"}]),
        "a temporary file": record(
            files=[{**entry, "name": ".autoencoder_cp=E0_U1_S0_trainer.th.0badc0de.tmp"}]
        ),
        "a name twice": record(files=[entry, entry]),
        "bad checksum": record(files=[{**entry, "checksum": "../../x"}]),
        "negative size": record(files=[{**entry, "size": -1}]),
        "bad sequence": record(sequence="7"),
        "not an object": ["delete", U1],
    }


KINDS = [
    "file outside the folder",
    "absolute file",
    "manifest outside",
    "not a manifest",
    "a file of another tag",
    "a manifest as a file",
    "the pins file",
    "not a checkpoint name",
    "a temporary file",
    "a name twice",
    "bad checksum",
    "negative size",
    "bad sequence",
    "not an object",
]


@pytest.mark.parametrize("kind", KINDS)
def test_a_hostile_delete_journal_is_refused_and_changes_nothing(run, tmp_path, kind):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.th").write_bytes(b"precious bytes outside the run")
    (run.folder / "notes.txt").write_text("mine")
    journal = plant_delete(run, hostile_records(run, tmp_path)[kind])
    before = tree(tmp_path)
    with pytest.raises((UnsafeCheckpointError, CorruptCheckpointError), match=journal.name):
        recover_folder(run.folder)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("entry", ["resume", "verify", "first save", "delete"])
def test_every_entry_point_refuses_a_hostile_delete_journal(run, tmp_path, monkeypatch, entry):
    journal = plant_delete(run, hostile_records(run, tmp_path)["a file of another tag"])
    before = tree(tmp_path)
    if entry == "verify":
        result = runner.invoke(app, ["verify", str(run.run_dir)])
        assert result.exit_code == 1 and journal.name in result.output
    else:
        with pytest.raises((UnsafeCheckpointError, CorruptCheckpointError), match=journal.name):
            if entry == "resume":
                select_resume_set(run.run_dir, GROUP)
            elif entry == "first save":
                forget_recovery(monkeypatch)
                run.save()
            else:
                LocalBackend(run.folder).delete_set("autoencoder_cp=E0_U2_S0.manifest.json")
    assert tree(tmp_path) == before


def test_a_symlinked_delete_journal_is_refused(run, tmp_path):
    target = tmp_path / "journal.json"
    target.write_bytes(encode_delete_journal(7, u1_record(run)))
    (run.folder / journal_filename(7)).symlink_to(target)
    before = tree(tmp_path)
    with pytest.raises(UnsafeCheckpointError, match="not a regular file"):
        recover_folder(run.folder)
    assert tree(tmp_path) == before


def test_the_default_delete_set_removes_the_manifest_first(run, monkeypatch):
    """A backend without its own delete_set (the interface's default) still goes manifest first."""
    from ksuit.storage.backend import Backend

    order = []
    backend = LocalBackend(run.folder)
    real_delete = backend.delete
    monkeypatch.setattr(backend, "delete", lambda names: (order.append(list(names)), real_delete(names))[1])
    Backend.delete_set(backend, U1)
    assert order[0] == [U1] and sorted(order[1]) == U1_FILES
    u1_gone(run)
