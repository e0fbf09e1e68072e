"""Crash consistency on S3 under SIGKILL: a real process saving to a real S3 endpoint (moto over
HTTP) is killed at random instants, during part uploads, between its data and its commit
record, and around the head swap.

After every kill: every object ending in `.th` in the bucket is a whole torch file (committed or
not); every committed set verifies (sizes, checksums) and loads; resume picks the newest
committed set, never older than before. At the end `ksuit verify --repair` leaves no object that
no committed set references and no unfinished multipart upload. Run with `-s` to see where the
kills landed.
"""

from __future__ import annotations

import io
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
import xxhash
from typer.testing import CliRunner

from ksuit.cli import app
from ksuit.readers import scan_sets, select_resume_set
from ksuit.storage import open_backend
from ksuit.storage.objectstore.commit import live_keys
from ksuit.storage.objectstore.records import HEAD_KEY, parse_private_key
from ksuit.utils.training import TrainingIteration

WORKER = Path(__file__).with_name("s3_kill_worker.py")
GROUP = "autoencoder"
LEAVES = ("autoencoder.encoder", "autoencoder.decoder")
KILLS = 25


class Zygote:
    """The forking parent of the savers, driven line by line."""

    def __init__(self, run_root: str, env: dict[str, str]):
        root = Path(__file__).resolve().parents[3]
        path = os.pathsep.join([str(root / "src"), str(root), os.environ.get("PYTHONPATH", "")])
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), run_root],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, **env, "OMP_NUM_THREADS": "1", "PYTHONPATH": path},
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

    def spawn(self, seed: int) -> int:
        self.proc.stdin.write(f"spawn {seed}\n".encode())
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
    """Checks the bucket after each kill; objects never change once written, so each is loaded
    and hashed once."""

    def __init__(self, s3, run: str, prefix: str):
        self.s3 = s3
        self.run = run
        self.prefix = prefix
        self.digests: dict[str, tuple[int, str]] = {}
        self.last_update = -1
        self.phases: dict[str, int] = {}
        self.seen: set[str] = set()
        self.seen_uploads: set[str] = set()

    def phase(self, keys: list[str], head) -> str:
        """Where the kill landed, from what it left that the last check had not seen."""
        new_keys = set(keys) - self.seen
        uploads = set(self.s3.uploads(self.prefix)) - self.seen_uploads
        self.seen |= new_keys
        self.seen_uploads |= uploads
        if uploads:
            return "during a multipart upload"
        saves = head.saves() if head is not None else set()
        records, data = set(), set()
        for key in new_keys:
            parsed = parse_private_key(key[len(self.prefix) :])
            if parsed and parsed[0] == "commit":
                records.add(parsed[1])
            elif parsed and parsed[0] == "data":
                data.add(parsed[1])
        if records - saves:
            return "after the commit record, before the head swap"
        if data - saves:
            return "after data objects, before the commit record"
        return "outside a save, or after its head swap"

    def check(self) -> None:
        keys = self.s3.keys(self.prefix)
        backend = open_backend(f"{self.run}/checkpoints")
        head = backend.read_head(fresh=True).head if keys else None
        phase = self.phase(keys, head)
        self.phases[phase] = self.phases.get(phase, 0) + 1
        for key in keys:  # objects never change: each is read once; every .th is whole, committed or not
            if key not in self.digests:
                data = self.s3.get(key)
                if key.endswith(".th"):
                    torch.load(io.BytesIO(data), weights_only=True)
                self.digests[key] = (len(data), xxhash.xxh3_64_hexdigest(data))
        if head is None:
            assert self.last_update < 0, "a run that had a checkpoint lost its head"
            return
        sets = scan_sets(self.run, checksum=False)
        view = backend.view()
        for s in sets:  # every committed set: each file's object holds what its manifest says
            assert s.ok, f"{s.group}@{s.tag}: {s.problems}"
            for name, entry in s.manifest.files.items():
                assert self.digests[self.prefix + view.files[name].key] == (entry.size, entry.checksum), name
        newest = max(
            (s.training_iteration.update for s in sets if s.group == GROUP and s.file(GROUP, "trainer")),
            default=-1,
        )
        chosen, skipped = select_resume_set(self.run, GROUP)
        assert skipped == [], skipped
        it = chosen.training_iteration
        assert it.update == newest, f"resume picked {it}, the newest committed set is at update {newest}"
        assert it.update >= self.last_update, f"resume went back from U{self.last_update} to {it}"
        self.last_update = it.update
        for entry in chosen.manifest.files.values():
            assert TrainingIteration.from_dict(entry.training_iteration) == it


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sigkills_while_saving_to_s3_leave_committed_sets_whole_and_repair_leaves_no_orphans(s3):
    rng = random.Random(11)
    run = f"{s3.url}/runs/run"
    checker = Checker(s3, run, "runs/run/checkpoints/")
    zygote = Zygote(f"{s3.url}/runs", s3.env)
    try:
        for i in range(KILLS):
            pid = zygote.spawn(i)
            zygote.expect("saving")
            time.sleep(rng.uniform(0.1, 1.4))
            os.kill(pid, signal.SIGKILL)
            line = zygote.readline(60)
            assert line.startswith(f"exit {pid} "), f"unexpected worker output {line!r}"
            status = int(line.split()[2])
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, line
            checker.check()
    finally:
        zygote.close()
    print(
        f"\n[S3 kill test] {KILLS} SIGKILLs survived; resumed up to update {checker.last_update}; "
        f"where they landed: {checker.phases}"
    )
    assert checker.last_update > 0, "no save ever completed: the delays are too short to test anything"
    assert checker.phases.get("during a multipart upload", 0) > 0, checker.phases

    result = CliRunner().invoke(app, ["verify", run, "--repair"])
    assert result.exit_code == 0, result.output
    backend = open_backend(f"{run}/checkpoints")
    head = backend.read_head(fresh=True).head
    alive = live_keys(backend, head) | {HEAD_KEY}
    left = [k for k in s3.keys(checker.prefix) if k[len(checker.prefix) :] not in alive]
    assert left == [], f"orphans after repair: {left[:5]}"
    assert s3.uploads() == []
    assert head.retired == {}
