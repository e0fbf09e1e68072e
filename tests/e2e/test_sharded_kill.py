"""At least 20 random SIGKILLs of 2-rank sharded (FSDP2) training, each killing one rank or
both at a random instant (often inside a save), each followed by `ksuit verify` and a resume;
the run then ends bitwise equal to an uninterrupted one. Sync and async saves alternate.

The ranks are real torchrun workers that fork each attempt (`sharded_zygote.py`): a kill costs
a fork, not a new interpreter importing torch."""

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from tests.conftest import assert_bitwise_equal
from tests.e2e.torchrun import HERE, env, torchrun
from typer.testing import CliRunner

from ksuit.cli import app
from ksuit.storage import load_file, open_backend
from ksuit.storage.sharded.load import load_full

pytestmark = pytest.mark.slow

CONFIG = HERE / "sharded_kill.yaml"
KILLS = 20
LATEST = "autoencoder_cp=latest.manifest.json"


class Zygotes:
    """The two torchrun workers and the attempts they run."""

    def __init__(self, control: Path):
        self.control = control
        self.attempt = 0
        self.log = control / "workers.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                torchrun(2, str(HERE / "sharded_zygote.py"), str(control)),
                env=env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: the test can end all of it
            )

    def start(self, job: dict | None) -> int:
        n = self.attempt
        self.attempt += 1
        path = self.control / f"go.{n}"
        path.with_suffix(".part").write_text(json.dumps(job))
        os.replace(path.with_suffix(".part"), path)
        return n

    def wait_file(self, name: str, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        path = self.control / name
        while not path.exists():
            assert self.proc.poll() is None, self.output()
            if time.monotonic() > deadline:
                return None
            time.sleep(0.005)
        return path.read_text()

    def pids(self, n: int) -> list[int]:
        return [int(self.wait_file(f"pid.{n}.{r}", 120)) for r in (0, 1)]

    def statuses(self, n: int, timeout: float) -> list[int | None]:
        return [None if (s := self.wait_file(f"done.{n}.{r}", timeout)) is None else int(s) for r in (0, 1)]

    def output(self) -> str:
        return self.log.read_text()[-6000:]

    def close(self) -> None:
        self.start(None)
        self.proc.wait(timeout=60)

    def end(self) -> None:
        """Kills the torchrun job this test started (its process group) if it still runs."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def job(output: Path, resume: bool, async_save: bool = False) -> dict:
    return {
        "config": str(CONFIG),
        "overrides": [f"trainer.async_save={str(async_save).lower()}"],
        "output": str(output),
        "run_id": "run",
        "resume": resume,
    }


def commit_sequence(run: Path) -> int:
    try:
        return json.loads((run / "checkpoints" / LATEST).read_text())["commit_sequence"]
    except (OSError, ValueError, KeyError):
        return -1


def final_payloads(run: Path) -> dict:
    folder = open_backend(run / "checkpoints")
    result = {}
    for leaf in ("encoder", "decoder"):
        for role in ("model", "optim"):
            name = f"autoencoder.{leaf}_cp=last_{role}.dcp"
            payload = load_full(folder.child(name))
            if isinstance(payload, dict):
                payload.pop("run_id", None)
            result[name] = payload
    trainer = load_file(run / "checkpoints" / "autoencoder_cp=last_trainer.th")
    result["trainer"] = {
        k: trainer[k] for k in ("training_iteration", "metrics", "train_loss") if k in trainer
    }
    return result


def test_twenty_random_sigkills_of_sharded_training(tmp_path):
    rng = random.Random(12)
    control = tmp_path / "control"
    control.mkdir()
    zygotes = Zygotes(control)
    kills, log = 0, []
    try:
        # the reference: the same run, uninterrupted
        n = zygotes.start(job(tmp_path / "ref", resume=False))
        assert zygotes.statuses(n, 180) == [0, 0]
        run = tmp_path / "killed" / "run"
        while kills < KILLS:
            n = zygotes.start(job(tmp_path / "killed", resume=kills > 0, async_save=kills % 2 == 1))
            pids = zygotes.pids(n)
            before = commit_sequence(run)
            deadline = time.monotonic() + 60
            while commit_sequence(run) == before:  # trained and saved at least once this attempt
                assert time.monotonic() < deadline, "no checkpoint within 60 s"
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.25))
            victims = rng.choice([[0], [1], [0, 1]])
            for r in victims:
                os.kill(pids[r], signal.SIGKILL)
            statuses = zygotes.statuses(n, 30)
            for r, status in enumerate(statuses):
                if status is None:  # a survivor blocked on its dead peer: kill it too
                    os.kill(pids[r], signal.SIGKILL)
            statuses = zygotes.statuses(n, 30)
            assert all(s is not None and s != 0 for s in statuses), (statuses, zygotes.output())
            kills += 1
            log.append(victims)
            verified = CliRunner().invoke(app, ["verify", str(run)])
            assert verified.exit_code == 0, f"after kill {kills} of ranks {victims}:\n{verified.output}"
        n = zygotes.start(job(tmp_path / "killed", resume=True))
        assert zygotes.statuses(n, 180) == [0, 0]
        zygotes.close()
    except AssertionError as e:
        e.add_note(f"after {kills} kills; the workers wrote:\n" + zygotes.output())
        raise
    finally:
        zygotes.end()
    assert CliRunner().invoke(app, ["verify", str(run)]).exit_code == 0
    assert kills >= 20 and any(len(v) == 2 for v in log) and any(len(v) == 1 for v in log)
    assert_bitwise_equal(final_payloads(tmp_path / "ref" / "run"), final_payloads(run))
