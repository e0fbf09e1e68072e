"""End to end on S3 (moto over HTTP): `ksuit train ... --output s3://...` stopped by SIGTERM, then
`--resume`d from S3, ends bitwise equal to an uninterrupted run; and a tiered run (local
`--output`, `trainer.checkpoint_mirror=s3://...`) resumes on a machine without its local folder
from the mirror, also bitwise equal."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.conftest import assert_bitwise_equal
from tests.e2e.test_resume_e2e import HERE, train_in_process, write_config

from ksuit.readers import list_checkpoints
from ksuit.storage import load_file

pytestmark = pytest.mark.slow


def last_files(folder: str | Path) -> dict[str, dict]:
    """The payloads of the `last` files of a run's checkpoint folder (path or URL)."""
    infos = [c for c in list_checkpoints(folder) if c.tag == "last" or c.tag == "best_model.loss.val"]
    return {c.name: load_file(c.path) for c in infos}


def assert_same_final_files(reference: Path, resumed: str | Path) -> None:
    ref, res = last_files(reference), last_files(resumed)
    assert sorted(ref) == sorted(res) and len(ref) >= 8, sorted(res)  # `last` (with EMA) and the best set
    for name, a in ref.items():
        b = res[name]
        if name.endswith("_trainer.th"):
            a, b = a["callback_state_dicts"], b["callback_state_dicts"]
            a.pop("sleep"), b.pop("sleep")
        assert_bitwise_equal(a, b, name)


def interrupt_on_latest(command: list[str], env: dict[str, str], has_latest) -> str:
    """Runs a slowed-down `ksuit train`, sends SIGTERM once `has_latest()`; returns its output."""
    proc = subprocess.Popen(
        [*command, "callbacks.-1.seconds=0.05"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 180
    while not has_latest():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no latest checkpoint within 180 s"
        time.sleep(0.05)
    time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 128 + signal.SIGTERM, out
    return out


def subprocess_env(s3) -> dict[str, str]:
    env = {**os.environ, **s3.env, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def manifest_exists(url: str):
    def check() -> bool:
        try:
            return any(c.tag == "latest" for c in list_checkpoints(url))
        except FileNotFoundError:
            return False

    return check


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("reference")
    config = write_config(folder, ema=True)
    train_in_process(str(config), "--output", str(folder), "--run-id", "run")
    return folder / "run"


def test_train_on_s3_stop_and_resume_from_s3_is_bitwise_equal(s3, tmp_path, reference):
    config = write_config(tmp_path, ema=True)
    output = f"{s3.url}/runs"
    command = [
        sys.executable,
        "-m",
        "ksuit",
        "train",
        str(config),
        "--output",
        output,
        "--run-id",
        "run",
        "--no-progress",
    ]
    out = interrupt_on_latest(command, subprocess_env(s3), manifest_exists(f"{output}/run"))
    assert f"--output {output}" in out  # the resume command it prints
    out = train_in_process(str(config), "--output", output, "--run-id", "run", "--resume")
    assert "resuming from checkpoint 'latest'" in out and "will differ" not in out
    assert_same_final_files(reference, f"{output}/run")
    assert s3.get("runs/run/config.yaml").startswith(b"model:")
    assert not [
        k for k in s3.keys() if k.startswith("runs/run/checkpoints/autoencoder")
    ]  # all behind the head


def test_a_tiered_run_resumes_from_its_mirror_on_a_machine_without_the_local_copy(s3, tmp_path, reference):
    config = write_config(tmp_path, ema=True, trainer_options={"checkpoint_mirror": f"{s3.url}/mirror"})
    local = tmp_path / "local"
    command = [
        sys.executable,
        "-m",
        "ksuit",
        "train",
        str(config),
        "--output",
        str(local),
        "--run-id",
        "run",
        "--no-progress",
    ]
    interrupt_on_latest(command, subprocess_env(s3), manifest_exists(f"{s3.url}/mirror/run"))
    shutil.rmtree(local)  # the new machine has no local folder
    out = train_in_process(str(config), "--output", str(local), "--run-id", "run", "--resume")
    assert f"in{s3.url}/mirror/run/checkpoints" in "".join(out.split()), out  # the log wraps lines
    assert_same_final_files(reference, local / "run")
    assert_same_final_files(reference, f"{s3.url}/mirror/run")  # and the mirror caught up
