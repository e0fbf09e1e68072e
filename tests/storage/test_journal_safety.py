"""Recovery treats what it finds in a run folder as untrusted, never replays an old switch over
newer sets, survives a switch that failed after its commit point, and deletes only ksuit's own
temporary files.

- A planted journal naming paths outside the folder, a temporary name off ksuit's grammar, a
  symlinked or oversized journal: refused with an error naming the journal by every entry point
  that runs recovery (recovery itself, resume, `ksuit verify`, the first save), and nothing
  anywhere changes.
- A rename failing after the commit point: the writer completes the switch before its next
  save; and a journal older than the sets it names is never rolled forward over them.
- A journal whose staged files are not all intact (a power cut made it durable before them) is
  discarded with its temporary files instead of half applied.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import ksuit.storage.backend as transaction
from ksuit.cli import app
from ksuit.layout import is_journal_filename, is_temp_filename, journal_filename, temp_filename
from ksuit.providers import PathProvider
from ksuit.readers import scan_sets, select_resume_set
from ksuit.storage import LocalBackend, PendingFile, SetWriter, load_file, recover_folder
from ksuit.storage.errors import CorruptCheckpointError, UnsafeCheckpointError
from ksuit.utils.training import TrainingIteration, UpdateCounter
from ksuit.writers.checkpoint_writer import CheckpointWriter
from ksuit.zoo.autoencoder import Autoencoder
from tests.conftest import FakeTrainer, autoencoder_config, train_one_step
from tests.storage.crash_sim import Recorder

GROUP = "autoencoder"
LATEST_TRAINER = "autoencoder_cp=latest_trainer.th"
runner = CliRunner()


class Run:
    """A run of the small composite model: every `save()` is one update, a progress tag and latest."""

    def __init__(self, root: Path):
        self.provider = PathProvider(root, "run")
        self.folder = self.provider.checkpoint_path
        self.run_dir = self.provider.run_output_path
        self.counter = UpdateCounter(
            None, TrainingIteration(epoch=30), updates_per_epoch=20, effective_batch_size=4
        )
        self.model = Autoencoder(autoencoder_config()).initialize()
        self.writer = CheckpointWriter(self.provider, self.counter)

    def save(self) -> int:
        train_one_step(self.model)
        self.counter.next_update()
        self.writer.save(
            self.model,
            str(self.counter.cur_iteration),
            trainer=FakeTrainer(self.counter),
            save_latest_weights=True,
            save_latest_optim=True,
        )
        return self.counter.update


def forget_recovery(monkeypatch) -> None:
    """As if the next save ran in a new process: recovery has not run there yet."""
    for module in ("ksuit.storage.local.recovery",):
        try:
            registry = getattr(__import__(module, fromlist=["_RECOVERED"]), "_RECOVERED", None)
        except ImportError:
            continue
        if registry is not None:
            registry.clear()


def tree(root: Path) -> dict[str, bytes | str]:
    """Every entry under `root` with its content (files) or kind."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = f"-> {os.readlink(path)}"
            elif path.is_dir():
                out[rel] = "dir"
            elif path.is_fifo():
                out[rel] = "fifo"
            else:
                out[rel] = path.read_bytes()
    return out


def names(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def leftovers(folder: Path) -> list[str]:
    return [n for n in names(folder) if is_temp_filename(n) or is_journal_filename(n)]


def latest_update(run: Run) -> int:
    chosen, _ = select_resume_set(run.run_dir, GROUP, tag="latest")
    return chosen.training_iteration.update


# ---- item 1: journals from outside ----------------------------------------------------------
@pytest.fixture
def hostile(tmp_path):
    """A run with one save, a victim file outside its folder, and a planted temp file."""
    run = Run(tmp_path / "out")
    run.save()
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.th"
    victim.write_bytes(b"precious bytes outside the run")
    planted = run.folder / temp_filename(LATEST_TRAINER, "0badc0de")
    torch.save({"w": torch.zeros(1)}, planted)
    return run, victim, planted


def plant(run: Run, victim: Path, planted: Path, kind: str) -> Path:
    """A journal of the given kind; returns its path."""
    journal = run.folder / journal_filename(7)
    rel_victim = os.path.relpath(victim, run.folder)
    renames = {
        "final outside": [[planted.name, rel_victim]],
        "final absolute": [[planted.name, str(victim)]],
        "temp outside": [[rel_victim, LATEST_TRAINER]],
        "temp of another file": [
            [temp_filename("autoencoder_cp=E0_U1_S0_trainer.th", "0badc0de"), LATEST_TRAINER]
        ],
    }
    if kind in renames:
        journal.write_text(json.dumps({"renames": renames[kind]}))
    elif kind == "symlinked journal":
        target = victim.parent / "journal.json"
        target.write_text(json.dumps({"renames": [[planted.name, LATEST_TRAINER]]}))
        journal.symlink_to(target)
    elif kind == "oversized journal":
        doc = {"renames": [[planted.name, LATEST_TRAINER]], "padding": "x" * (5 << 20)}
        journal.write_text(json.dumps(doc))
    elif kind == "fifo journal":
        os.mkfifo(journal)
    return journal


def run_entry(entry: str, run: Run, monkeypatch) -> str:
    """Runs recovery through `entry`; returns the error text it ends with."""
    if entry == "verify":
        result = runner.invoke(app, ["verify", str(run.run_dir)])
        assert result.exit_code != 0, result.output
        return f"{result.output} {result.exception}"
    with pytest.raises((UnsafeCheckpointError, CorruptCheckpointError)) as info:
        if entry == "recover":
            recover_folder(run.folder)
        elif entry == "resume":
            select_resume_set(run.run_dir, GROUP)
        else:  # the first save of a new process
            forget_recovery(monkeypatch)
            run.save()
    return str(info.value)


ESCAPES = ["final outside", "final absolute", "temp outside"]
OTHERS = ["temp of another file", "symlinked journal", "oversized journal", "fifo journal"]


@pytest.mark.parametrize("entry", ["recover", "resume", "verify", "first save"])
@pytest.mark.parametrize("kind", ESCAPES)
def test_a_journal_naming_paths_outside_the_folder_is_refused(hostile, tmp_path, monkeypatch, entry, kind):
    run, victim, planted = hostile
    journal = plant(run, victim, planted, kind)
    before = tree(tmp_path)
    message = run_entry(entry, run, monkeypatch)
    assert journal.name in message
    assert "not a plain file name" in message or "off ksuit's temp grammar" in message
    assert tree(tmp_path) == before  # nothing moved, overwritten or deleted, inside or outside


@pytest.mark.parametrize("kind", OTHERS)
def test_a_journal_off_the_grammar_or_not_a_small_regular_file_is_refused(hostile, tmp_path, kind):
    run, victim, planted = hostile
    journal = plant(run, victim, planted, kind)
    before = tree(tmp_path)
    with pytest.raises((UnsafeCheckpointError, CorruptCheckpointError), match=journal.name):
        recover_folder(run.folder)
    assert tree(tmp_path) == before


# ---- item 5: a failed switch is never replayed over newer sets --------------------------------
def fail_rename(monkeypatch, call: int, exc: BaseException) -> None:
    """The `call`-th os.replace from now raises `exc` instead of renaming (the first one of a
    save is the journal's: its commit point)."""
    real, calls = os.replace, [0]

    def replace(src, dst, **kw):
        calls[0] += 1
        if calls[0] == call:
            monkeypatch.setattr(os, "replace", real)
            raise exc
        return real(src, dst, **kw)

    monkeypatch.setattr(os, "replace", replace)


def test_a_switch_failing_after_its_commit_is_completed_before_the_next_save(tmp_path, monkeypatch):
    run = Run(tmp_path)
    run.save()
    fail_rename(monkeypatch, 3, OSError(errno.EIO, "I/O error (injected)"))
    with pytest.raises(OSError, match="injected"):
        run.save()  # update 2: committed, two renames applied
    assert run.save() == 3  # the caller keeps saving
    assert run.save() == 4
    assert leftovers(run.folder) == []
    forget_recovery(monkeypatch)  # a new process resumes
    chosen, skipped = select_resume_set(run.run_dir, GROUP)
    assert chosen.training_iteration.update == 4 and skipped == []
    assert latest_update(run) == 4
    assert all(s.ok for s in scan_sets(run.run_dir, checksum=True))


def test_recovery_never_replays_a_journal_over_newer_sets(tmp_path, monkeypatch):
    """A journal left by a failed switch of update 2 and then hidden from the writer (as by an
    older ksuit that did not look for journals before each save) comes back after updates 3
    and 4: recovery must not roll `latest` back to update 2."""
    run = Run(tmp_path)
    run.save()
    fail_rename(monkeypatch, 3, OSError(errno.EIO, "I/O error (injected)"))
    with pytest.raises(OSError, match="injected"):
        run.save()
    (journal,) = [p for p in run.folder.iterdir() if is_journal_filename(p.name)]
    hidden = run.folder.parent / "hidden-journal"
    journal.rename(hidden)
    run.save()
    run.save()
    hidden.rename(journal)
    forget_recovery(monkeypatch)
    chosen, skipped = select_resume_set(run.run_dir, GROUP)
    assert chosen.training_iteration.update == 4 and skipped == []
    assert latest_update(run) == 4
    assert leftovers(run.folder) == []
    assert all(s.ok for s in scan_sets(run.run_dir, checksum=True))


# ---- item 6: power loss: staged files durable before the journal, checked on recovery --------
class Crash(BaseException):
    """The process dies here."""


def crash_at_rename(monkeypatch, run: Run, call: int) -> None:
    """Saves update 2 and 'crashes' at its `call`-th os.replace (1: the journal's)."""
    fail_rename(monkeypatch, call, Crash())
    with pytest.raises(Crash):
        run.save()


@pytest.mark.parametrize("damage", ["lost", "truncated"])
def test_a_journal_whose_staged_files_are_not_all_intact_is_discarded(tmp_path, monkeypatch, damage):
    run = Run(tmp_path)
    run.save()
    crash_at_rename(monkeypatch, run, 2)  # right after the commit point: journal and every temp
    temp = run.folder / next(
        n for n in names(run.folder) if n.startswith(".autoencoder.decoder_cp=latest_optim")
    )
    if damage == "lost":  # a power cut kept the journal but not this name
        temp.unlink()
    else:
        temp.write_bytes(temp.read_bytes()[:-100])
    forget_recovery(monkeypatch)
    report = recover_folder(run.folder)
    assert report.rolled_forward == [] and len(report.discarded) == 1
    assert leftovers(run.folder) == []
    assert all(s.ok for s in scan_sets(run.run_dir, checksum=True))
    assert latest_update(run) == 1  # the previous set stands, whole


def test_a_journal_with_some_renames_done_is_completed(tmp_path, monkeypatch):
    run = Run(tmp_path)
    run.save()
    crash_at_rename(monkeypatch, run, 5)  # three files already renamed into place
    forget_recovery(monkeypatch)
    report = recover_folder(run.folder)
    assert len(report.rolled_forward) == 12 - 3 and report.discarded == []
    assert leftovers(run.folder) == []
    assert all(s.ok for s in scan_sets(run.run_dir, checksum=True))
    assert latest_update(run) == 2


def test_staged_names_are_made_durable_before_the_journal(tmp_path):
    writer = SetWriter(tmp_path)
    files = [
        PendingFile(f"m_cp=latest_{k}.th", {"x": torch.ones(2)}, role=k, group="m", tag="latest")
        for k in ("model", "optim")
    ]
    writer.write_set(files)  # recovery done, folder exists
    with Recorder(tmp_path) as rec:
        writer.write_set(files)
    ops = rec.recording.ops
    journal_create = next(
        i for i, op in enumerate(ops) if op.kind == "create" and ".ksuit-journal" in op.name
    )
    last_staged = max(i for i, op in enumerate(ops[:journal_create]) if op.kind == "create")
    assert any(op.kind == "fsync_dir" for op in ops[last_staged:journal_create]), [op.kind for op in ops]


def test_run_folders_are_created_durably(tmp_path, monkeypatch):
    """Every folder the local backend creates for a run has its parent fsynced after it appeared."""
    real_open, real_fsync, real_close, real_mkdir = os.open, os.fsync, os.close, os.mkdir
    dir_fds: dict[int, str] = {}
    events: list[tuple[str, str]] = []

    def mkdir(path, *a, **kw):
        real_mkdir(path, *a, **kw)
        events.append(("mkdir", os.path.abspath(path)))

    def open_(path, flags, *a, **kw):
        fd = real_open(path, flags, *a, **kw)
        if isinstance(path, (str, os.PathLike)) and os.path.isdir(path):
            dir_fds[fd] = os.path.abspath(path)
        return fd

    def fsync(fd):
        real_fsync(fd)
        if fd in dir_fds:
            events.append(("fsync", dir_fds[fd]))

    def close(fd):
        dir_fds.pop(fd, None)
        real_close(fd)

    for name, fn in (("mkdir", mkdir), ("open", open_), ("fsync", fsync), ("close", close)):
        monkeypatch.setattr(os, name, fn)
    folder = PathProvider(tmp_path / "a" / "b", "run", stage_name="stage").checkpoint_path
    LocalBackend(folder).ensure_folder()
    monkeypatch.undo()
    created = [p for kind, p in events if kind == "mkdir"]
    assert created == [
        str(tmp_path / "a"),
        str(tmp_path / "a" / "b"),
        str(tmp_path / "a/b/run"),
        str(tmp_path / "a/b/run/stage"),
        str(folder),
    ]
    for i, (kind, path) in enumerate(events):
        if kind == "mkdir":
            assert ("fsync", os.path.dirname(path)) in events[i + 1 :], (
                f"parent of {path} not fsynced: {events}"
            )


# ---- item 12: read-only copies, obstacles, foreign temp files ---------------------------------
@pytest.fixture
def small_tmpfs(tmp_path):
    mount_point = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_verify_on_a_read_only_copy_reports_what_recovery_could_not_do(small_tmpfs):
    run = Run(small_tmpfs)
    run.save()
    leftover = run.folder / temp_filename("autoencoder_cp=E0_U2_S0_model.th", "0badc0de")
    leftover.write_bytes(b"half a file")
    proc = subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot remount read-only: {proc.stderr.strip()}")
    result = runner.invoke(app, ["verify", str(run.run_dir)])
    assert result.exit_code == 0, result.output
    assert "could not remove the leftover temporary file" in result.output and leftover.name in result.output
    assert "2 sets, 0 with problems" in result.output
    assert leftover.exists()


def test_a_folder_at_a_final_name_after_the_commit_does_not_wedge_the_run(tmp_path, monkeypatch):
    run = Run(tmp_path)
    run.save()
    obstacle = run.folder / "autoencoder.decoder_cp=latest_optim.th"
    real = os.replace

    def replace(src, dst, **kw):
        real(src, dst, **kw)
        if is_journal_filename(Path(dst).name):  # right after the commit point
            monkeypatch.setattr(os, "replace", real)
            obstacle.unlink()
            obstacle.mkdir()

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        run.save()  # update 2

    forget_recovery(monkeypatch)
    report = recover_folder(run.folder)  # does not raise
    assert (
        len(report.pending) == 1
        and obstacle.name in report.problems[0]
        and "Move it away" in report.problems[0]
    )
    chosen, skipped = select_resume_set(run.run_dir, GROUP)  # the other sets stay usable
    assert chosen.tag.startswith("E0_U2") and chosen.training_iteration.update == 2
    assert load_file(chosen.file(GROUP, "trainer").path)["training_iteration"]["update"] == 2
    with pytest.raises(
        transaction.PendingSwitchError, match=r"(?s)latest_optim.th.*is a folder.*Move it away"
    ):
        run.save()  # update 3 would write latest: refused, naming the obstacle and the fix

    obstacle.rmdir()
    assert run.save() == 4  # the pending switch is completed first, then the save goes through
    forget_recovery(monkeypatch)
    chosen, skipped = select_resume_set(run.run_dir, GROUP)
    assert chosen.training_iteration.update == 4 and skipped == []
    assert leftovers(run.folder) == []
    assert all(s.ok for s in scan_sets(run.run_dir, checksum=True))


def test_a_folder_at_a_final_name_before_a_save_is_refused_before_writing(tmp_path):
    run = Run(tmp_path)
    run.save()
    obstacle = run.folder / "autoencoder.decoder_cp=latest_optim.th"
    obstacle.unlink()
    obstacle.mkdir()
    before = names(run.folder)
    with pytest.raises(IsADirectoryError, match="latest_optim.th: a folder is in the way"):
        run.save()
    assert names(run.folder) == before


def test_recovery_deletes_only_ksuit_temporary_files(tmp_path):
    ours = [
        temp_filename("autoencoder_cp=E9_U9_S9_model.th", "0badc0de"),
        temp_filename("autoencoder_cp=latest.manifest.json", "0badc0de"),
        temp_filename(journal_filename(3), "0badc0de"),
        temp_filename("plain.th", "0badc0de"),
    ]
    foreign = [
        ".notes.tmp",
        ".vimrc.swp.tmp",
        ".something.0badc0de.tmp",  # not a name ksuit writes
        ".autoencoder_cp=latest_model.th.xyz.tmp",  # not a token ksuit draws
        ".autoencoder_cp=latest_model.th.0BADC0DE.tmp",
        ".autoencoder_cp=latest_model.th.0badc0de0.tmp",
    ]
    for name in ours + foreign:
        (tmp_path / name).write_bytes(b"x")
    report = recover_folder(tmp_path)
    assert sorted(report.removed_temps) == sorted(ours)
    assert names(tmp_path) == sorted(foreign)
