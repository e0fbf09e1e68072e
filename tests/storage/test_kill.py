"""Crash consistency under SIGKILL: a real process saving in a loop is killed at random instants.

After every kill the run must (1) hold only `.th` files that load with `weights_only=True`,
even before recovery, (2) after recovery hold no temporary file, no journal and no manifest
that lists a missing, short or altered file, and (3) resume from a complete set whose model,
optimizer and trainer files all come from the same training iteration, never older than the
one resumed from before the kill. Run with `-s` to see how many kills were survived and in
which phase of the save they landed.
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ksuit.cli import app
from ksuit.layout import is_journal_filename, is_temp_filename
from ksuit.readers import scan_sets, select_resume_set
from ksuit.storage.manifest import verify_file

WORKER = Path(__file__).with_name("kill_worker.py")
GROUP = "autoencoder"
LEAVES = ("autoencoder.encoder", "autoencoder.decoder")


class Zygote:
    """The forking parent of the savers (see kill_worker.py), driven line by line."""

    def __init__(self, run_root: Path):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(run_root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self._buf = b""
        assert self.readline(120) == "zygote-ready"

    def readline(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"no line from the kill worker within {timeout}s (got {self._buf!r})")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise EOFError(f"kill worker exited with {self.proc.wait()}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def expect(self, prefix: str, timeout: float = 60) -> list[str]:
        line = self.readline(timeout)
        assert not line.startswith("error"), f"worker failed: {line}"
        assert line.startswith(prefix + " "), f"expected {prefix!r}, got {line!r}"
        return line.split()[1:]

    def spawn(self, mode: str, seed: int) -> int:
        self.proc.stdin.write(f"spawn {mode} {seed}\n".encode())
        self.proc.stdin.flush()
        return int(self.expect("pid")[0])

    def close(self) -> None:
        try:
            self.proc.stdin.write(b"quit\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


class Checker:
    """Verifies the run folder after each kill; files already verified unchanged are skipped
    (same inode, size and mtime), so the cost stays linear in what was written."""

    def __init__(self, run_dir: Path, verify: bool = False):
        self.run_dir = run_dir
        self.verify = verify  # also run `ksuit verify` after each kill
        self.folder = run_dir / "checkpoints"
        self.loaded: set[tuple] = set()
        self.hashed: set[tuple] = set()
        self.last_update = -1
        self.phases: dict[str, int] = {}

    @staticmethod
    def _key(path: Path) -> tuple:
        st = path.stat()
        return (path.name, st.st_ino, st.st_size, st.st_mtime_ns)

    def every_th_loads(self) -> None:
        for path in self.folder.glob("*.th"):
            key = self._key(path)
            if key not in self.loaded:
                torch.load(path, weights_only=True)  # raises on a torn file or a foreign pickle
                self.loaded.add(key)

    def phase(self) -> str:
        names = os.listdir(self.folder) if self.folder.is_dir() else []
        if any(is_journal_filename(n) and b'"delete"' in (self.folder / n).read_bytes() for n in names):
            return "deleting a set (delete journal present)"
        if any(is_journal_filename(n) for n in names):
            if any(is_temp_filename(n) for n in names):
                return "committed, between renames (journal and temps present)"
            return "committed, renames done, journal not yet removed"
        if any(is_temp_filename(n) for n in names):
            return "staging (temp files, no journal)"
        return "between files / outside a save"

    def check(self) -> None:
        if not self.folder.is_dir():
            assert self.last_update < 0
            self.phases["before the first save"] = self.phases.get("before the first save", 0) + 1
            return
        phase = self.phase()
        self.phases[phase] = self.phases.get(phase, 0) + 1
        self.every_th_loads()  # before recovery: every visible .th file is whole

        try:
            chosen, skipped = select_resume_set(self.run_dir, GROUP)  # runs recovery
        except FileNotFoundError:
            assert self.last_update < 0, "a run that had a checkpoint was left with nothing to resume from"
            return
        names = os.listdir(self.folder)
        assert not [n for n in names if is_temp_filename(n) or is_journal_filename(n)], names
        assert skipped == [], f"recovery left incomplete sets visible: {skipped}"
        self.every_th_loads()

        for s in scan_sets(self.run_dir, checksum=False):
            assert s.ok, f"set {s.group}@{s.tag}: {s.problems}"
            for name, entry in s.manifest.files.items():
                key = self._key(self.folder / name)
                if key not in self.hashed:
                    assert verify_file(self.folder, name, entry, checksum=True) is None, name
                    self.hashed.add(key)

        it = chosen.training_iteration
        assert it is not None and it.is_fully_specified
        assert it.update >= self.last_update, f"resume went back from U{self.last_update} to {it}"
        self.last_update = it.update
        expected = dict(it)
        for leaf in LEAVES:
            weights = torch.load(chosen.file(leaf, "model").path, weights_only=True)
            assert weights["training_iteration"] == expected
            optim = torch.load(chosen.file(leaf, "optim").path, weights_only=True)
            steps = {int(s["step"]) for s in optim["state"].values()}
            assert steps == {it.update}, f"{leaf} optimizer at steps {steps}, set at {it}"
        trainer = torch.load(chosen.file(GROUP, "trainer").path, weights_only=True)
        assert trainer["training_iteration"] == expected
        for entry in chosen.manifest.files.values():
            assert entry.training_iteration == expected
        if self.verify:
            result = CliRunner().invoke(app, ["verify", str(self.run_dir)])
            assert result.exit_code == 0, result.output


def run_kills(
    tmp_path: Path, mode: str, kills: int, max_delay: float, seed: int, verify: bool = False
) -> Checker:
    rng = random.Random(seed)
    run_dir = tmp_path / mode / "run"
    checker = Checker(run_dir, verify)
    zygote = Zygote(tmp_path / mode)
    survived = early_kills = 0
    try:
        for i in range(kills):
            pid = zygote.spawn(mode, i)
            early = rng.random() < 0.1  # some kills land in recovery / resume loading
            if not early:
                zygote.expect("saving")
            time.sleep(rng.uniform(0, 0.02 if early else max_delay))
            os.kill(pid, signal.SIGKILL)
            rest = zygote.readline(60)
            while rest.startswith("saving"):
                rest = zygote.readline(60)
            assert rest.startswith(f"exit {pid} "), f"unexpected worker output {rest!r}"
            status = int(rest.split()[2])
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, rest
            checker.check()
            survived += 1
            early_kills += early
    finally:
        zygote.close()
    print(
        f"\n[kill test, {mode}] {survived} SIGKILLs survived ({early_kills} of them 0-20 ms after start: "
        f"start-up, recovery, resume loading); resumed up to update {checker.last_update}; "
        f"state left by the kills: {checker.phases}"
    )
    return checker


def kill_at_phases(tmp_path: Path, mode: str, phases: list[str]) -> Checker:
    """One kill at each named point of a save (see kill_worker.py), each checked like the
    random kills: the random instants cover the breadth, these make sure both sides of the
    commit point are always among them."""
    run_dir = tmp_path / f"{mode}-phases" / "run"
    checker = Checker(run_dir)
    zygote = Zygote(tmp_path / f"{mode}-phases")
    try:
        for i, phase in enumerate(phases):
            pid = zygote.spawn(f"{mode}@{phase}", 100 + i)
            zygote.expect("saving")
            assert zygote.expect("paused") == [str(pid), phase]
            os.kill(pid, signal.SIGKILL)
            assert zygote.readline(60).startswith(f"exit {pid} ")
            checker.check()
    finally:
        zygote.close()
    return checker


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sigkill_during_sync_saves_leaves_a_consistent_resumable_run(tmp_path):
    checker = run_kills(tmp_path, "sync", kills=60, max_delay=0.25, seed=1)
    assert checker.last_update > 0, "no save ever completed: the delays are too short to test anything"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_before_and_after_the_commit_point(tmp_path, mode):
    checker = kill_at_phases(tmp_path, mode, ["staged", "committed", "staged", "committed"])
    assert checker.phases.get("staging (temp files, no journal)", 0) == 2, checker.phases
    assert sum(n for p, n in checker.phases.items() if p.startswith("committed")) == 2, checker.phases
    assert checker.last_update > 0


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sigkill_during_async_saves_leaves_a_consistent_resumable_run(tmp_path):
    checker = run_kills(tmp_path, "async", kills=25, max_delay=0.25, seed=2)
    assert checker.last_update > 0


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize(("mode", "seed"), [("retention", 3), ("budget", 4)])
def test_sigkill_during_retention_deletes_leaves_a_verified_resumable_run(tmp_path, mode, seed):
    """Every save deletes a set after committing (`retention`) or evicts one before writing
    (`budget`): after each of 18 kills per mode `ksuit verify` passes, no journal or temporary
    file is left, and resume picks the set it picked before the kill or a newer one."""
    checker = run_kills(tmp_path, mode, kills=18, max_delay=0.4, seed=seed, verify=True)
    assert checker.last_update > 0
