"""Another process reading a run while it saves (`ksuit verify`, a resume, an export) waits for
the save in flight instead of deleting its staged files as a crash's leftovers."""

from __future__ import annotations

import os
import time

from typer.testing import CliRunner

from ksuit.cli import app
from ksuit.layout import temp_filename
from ksuit.readers import select_resume_set
from ksuit.storage.local.locking import folder_lock
from ksuit.storage.local.recovery import recover_folder
from tests.conftest import save_resumable_set

HOLD_S = 1.0


def fork_saver_in_flight(folder):
    """A child process that holds the folder lock with a staged file for HOLD_S seconds, then
    renames it into place (the tail of a save); returns (pid, final path) once it holds the lock."""
    final = folder / "late_cp=latest_model.th"
    staged = folder / temp_filename(final.name, "c0ffee00")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: plain file operations only, then _exit
        code = 1
        try:
            os.close(read_end)
            with folder_lock(folder):
                staged.write_bytes(b"staged bytes")
                os.write(write_end, b"x")
                time.sleep(HOLD_S)
                os.replace(staged, final)
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    assert os.read(read_end, 1) == b"x"
    os.close(read_end)
    return pid, final, staged


def wait_child(pid):
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_recovery_in_another_process_waits_for_the_save_in_flight(tmp_path):
    pid, final, staged = fork_saver_in_flight(tmp_path)
    start = time.monotonic()
    report = recover_folder(tmp_path)
    waited = time.monotonic() - start
    wait_child(pid)
    assert waited >= HOLD_S * 0.8, f"recovery did not wait for the save in flight ({waited:.2f}s)"
    assert report.removed_temps == []
    assert final.read_bytes() == b"staged bytes" and not staged.exists()


def test_verify_and_resume_wait_too(path_provider, update_counter):
    save_resumable_set(path_provider, update_counter)
    folder, run_dir = path_provider.checkpoint_path, path_provider.run_output_path
    for check in (
        lambda: CliRunner().invoke(app, ["verify", str(run_dir)]).exit_code,
        lambda: select_resume_set(run_dir, "autoencoder")[0].tag,
    ):
        pid, final, _ = fork_saver_in_flight(folder)
        start = time.monotonic()
        check()
        waited = time.monotonic() - start
        wait_child(pid)
        assert waited >= HOLD_S * 0.8, f"did not wait for the save in flight ({waited:.2f}s)"
        assert final.exists()
        final.unlink()


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    with folder_lock(tmp_path):
        with folder_lock(tmp_path):
            recover_folder(tmp_path)  # takes the lock again: must not deadlock
