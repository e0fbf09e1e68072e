"""End to end, with real processes: `python -m ksuit train` stopped by SIGTERM or killed with
SIGKILL, then `--resume`d, ends bitwise equal to an uninterrupted run; the same under torchrun
with two processes (gloo on loopback)."""

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from tests.conftest import assert_bitwise_equal
from tests.e2e.torchrun import torchrun
from typer.testing import CliRunner

from ksuit.cli import app
from ksuit.storage import load_file

HERE = Path(__file__).parent
TINY = HERE / "tiny_autoencoder.yaml"
EXAMPLE = HERE.parents[1] / "examples" / "autoencoder.yaml"

pytestmark = pytest.mark.slow


# ways to save: the trainer options each adds to the config (the SIGKILL test runs them all)
SAVE_MODES = {
    "sync": {},
    "async": {"async_save": True},
    "async-safetensors": {"async_save": True, "checkpoint_format": "safetensors"},
}


def write_config(
    tmp_path: Path, ema: bool = True, epochs: int = 5, trainer_options: dict | None = None
) -> Path:
    raw = yaml.safe_load(TINY.read_text())
    raw["trainer"]["max_epochs"] = epochs
    raw["trainer"].update(trainer_options or {})
    if not ema:
        raw["callbacks"] = [c for c in raw["callbacks"] if c["kind"] != "ema"]
    raw["callbacks"].append({"kind": "slow_callbacks.Sleep", "seconds": 0.0})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def env() -> dict[str, str]:
    result = dict(os.environ)
    result["PYTHONPATH"] = os.pathsep.join([str(HERE), result.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    result["OMP_NUM_THREADS"] = "1"
    return result


def train_in_process(*args: str) -> str:
    """`ksuit train` in this process (the configs pin num_threads, so it matches the subprocesses)."""
    sys.path.insert(0, str(HERE))
    try:
        result = CliRunner().invoke(app, ["train", *args, "--no-progress"])
    finally:
        sys.path.remove(str(HERE))
    assert result.exit_code == 0, result.output
    return result.output


def ksuit_train(*args: str, nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "ksuit", "train", *args, "--no-progress"]
    # --standalone: torchrun binds a free port itself, no port a test picked that another takes
    return torchrun(nproc, "-m", "ksuit", "train", *args, "--no-progress")


def run_to_end(command: list[str]) -> str:
    done = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def interrupt(command: list[str], run_dir: Path, signum: int) -> tuple[int, str]:
    """Starts a slowed-down run, sends `signum` once its first `latest` checkpoint exists."""
    proc = subprocess.Popen(
        [*command, "callbacks.-1.seconds=0.05"],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    manifest = run_dir / "checkpoints" / "autoencoder_cp=latest.manifest.json"
    deadline = time.monotonic() + 120
    while not manifest.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no latest checkpoint within 120 s"
        time.sleep(0.02)
    time.sleep(0.15)  # land somewhere inside the next updates, possibly in a save
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


def assert_same_final_files(reference: Path, resumed: Path, ema: bool, weights_ext: str = "th") -> None:
    ref_dir, res_dir = reference / "checkpoints", resumed / "checkpoints"
    names = sorted(p.name for p in ref_dir.glob("*_cp=last_*") if not p.name.endswith(".json"))
    expected = 2 * 2 + 1 + (2 if ema else 0)  # weights + optim of both, trainer, EMA of both
    assert len(names) == expected, names
    assert {f"autoencoder.{m}_cp=last_model.{weights_ext}" for m in ("encoder", "decoder")} <= set(names)
    if ema:  # the EMA weights follow the checkpoint format too
        assert {
            f"autoencoder.{m}_ema=0.9_cp=last_model.{weights_ext}" for m in ("encoder", "decoder")
        } <= set(names)
    for name in names + [f"autoencoder.encoder_cp=best_model.loss.val_model.{weights_ext}"]:
        a, b = load_file(ref_dir / name), load_file(res_dir / name)
        if name.endswith("_trainer.th"):
            a, b = a["callback_state_dicts"], b["callback_state_dicts"]  # RNG of the same runs may not match
            for cb in ("sleep",):
                a.pop(cb), b.pop(cb)
        assert_bitwise_equal(a, b, name)


def resume_command_of(out: str) -> list[str]:
    line = out[out.index("Resume with:") :].splitlines()[1].strip()
    return shlex.split(line)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """`uninterrupted(fmt)`: an uninterrupted run of the same config (with EMA, saving
    synchronously) writing weights in format `fmt`; run once per format."""
    runs: dict[str, Path] = {}

    def run(fmt: str = "torch") -> Path:
        if fmt not in runs:
            folder = tmp_path_factory.mktemp(f"reference-{fmt}")
            config = write_config(folder, ema=True, trainer_options={"checkpoint_format": fmt})
            train_in_process(str(config), "--output", str(folder), "--run-id", "run")
            runs[fmt] = folder / "run"
        return runs[fmt]

    return run


@pytest.fixture(scope="module")
def reference(uninterrupted):
    """An uninterrupted run of the default config (with EMA)."""
    return uninterrupted("torch")


def test_sigterm_then_resume_is_bitwise_equal(tmp_path, reference):
    config = write_config(tmp_path, ema=True)
    command = ksuit_train(str(config), "--output", str(tmp_path), "--run-id", "run")
    code, out = interrupt(command, tmp_path / "run", signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, out
    assert "SIGTERM: training stopped at E" in out and "after saving checkpoint 'latest'" in out
    resume = resume_command_of(out)
    assert resume[:2] == ["ksuit", "train"] and resume[-1] == "--resume" and "--run-id" in resume
    out = run_to_end([sys.executable, "-m", "ksuit", *resume[1:], "--no-progress"])
    assert "resuming from checkpoint 'latest'" in out
    assert_same_final_files(reference, tmp_path / "run", ema=True)


@pytest.mark.parametrize("save_mode", list(SAVE_MODES))
def test_sigkill_then_resume_is_bitwise_equal(tmp_path, uninterrupted, save_mode):
    # the EMA files join the trainer's set switch, so even they are exact whatever the moment
    options = SAVE_MODES[save_mode]
    fmt = options.get("checkpoint_format", "torch")
    reference = uninterrupted(fmt)  # async saving ends bitwise equal to an uninterrupted sync run
    config = write_config(tmp_path, ema=True, trainer_options=options)
    command = ksuit_train(str(config), "--output", str(tmp_path), "--run-id", "run")
    code, out = interrupt(command, tmp_path / "run", signal.SIGKILL)
    assert code == -signal.SIGKILL, out
    out = train_in_process(str(config), "--output", str(tmp_path), "--run-id", "run", "--resume")
    assert "resuming from checkpoint" in out
    assert "will differ from an uninterrupted run" not in out
    weights_ext = "safetensors" if fmt == "safetensors" else "th"
    assert_same_final_files(reference, tmp_path / "run", ema=True, weights_ext=weights_ext)


def test_torchrun_two_processes_stop_and_resume(tmp_path):
    config = write_config(tmp_path, ema=True, epochs=3)
    ref = tmp_path / "ref"
    out = run_to_end(ksuit_train(str(config), "--output", str(ref), "--run-id", "run", nproc=2))
    assert "4 per process and step" in out
    trainer_state = load_file(ref / "run" / "checkpoints" / "autoencoder_cp=last_trainer.th")
    assert trainer_state["rng"]["world_size"] == 2 and len(trainer_state["rng"]["ranks"]) == 2
    ranks = trainer_state["rng"]["ranks"]
    assert not torch.equal(ranks[0]["torch"], ranks[1]["torch"])  # every rank's own generator is kept

    out_dir = tmp_path / "stopped"
    command = ksuit_train(str(config), "--output", str(out_dir), "--run-id", "run", nproc=2)
    code, out = interrupt(command, out_dir / "run", signal.SIGTERM)
    assert code != 0, out
    assert "torchrun --nproc_per_node=2 -m ksuit train" in out
    # a single process continues the two-process checkpoint too (elastic resume), here on a copy
    shutil.copytree(out_dir / "run", tmp_path / "one" / "run")
    out = train_in_process(str(config), "--output", str(tmp_path / "one"), "--run-id", "run", "--resume")
    assert "resuming a run of 2 processes on 1" in out
    run_to_end(ksuit_train(str(config), "--output", str(out_dir), "--run-id", "run", "--resume", nproc=2))
    assert_same_final_files(ref / "run", out_dir / "run", ema=True)


def test_the_example_trains(tmp_path):
    out = train_in_process(
        str(EXAMPLE), "trainer.max_epochs=2", "--output", str(tmp_path), "--run-id", "demo"
    )
    assert "loss/val" in out
    folder = tmp_path / "demo" / "checkpoints"
    for name in (
        "autoencoder.encoder_cp=last_model.th",
        "autoencoder.decoder_cp=latest_optim.th",
        "autoencoder_cp=latest_trainer.th",
        "autoencoder.encoder_cp=best_model.loss.val_model.th",
    ):
        assert (folder / name).exists(), name
