"""A plain PyTorch loop (no ksuit trainer): `ksuit.LoopState` and `ksuit.resume` with a wrapped
module continue exactly, also after a SIGKILL in the middle of a save."""

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import ksuit
from ksuit.cli import app
from ksuit.storage import load_file
from tests.conftest import assert_bitwise_equal
from tests.integrations import loop_worker

WORKER = Path(loop_worker.__file__)
ROOT = Path(__file__).resolve().parents[2]


def make(out: Path):
    net = nn.Linear(3, 1)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    model = ksuit.models.wrap(net, "lin", optimizer=opt)
    loop = ksuit.LoopState(scheduler=sched)
    return net, opt, sched, model, loop, ksuit.CheckpointWriter(ksuit.PathProvider(out, "run"), loop)


def test_loop_state_carries_counters_rng_and_named_objects():
    opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    loop = ksuit.LoopState(step=7, epoch=1, sample=56, scheduler=sched)
    assert str(loop.cur_iteration) == "E1_U7_S56"
    state = loop.state_dict()
    expected = (torch.rand(3), random.random(), np.random.rand())
    opt.step()
    sched.step()
    other = ksuit.LoopState(scheduler=sched)
    other.load_state_dict(state)
    assert (other.step, other.epoch, other.sample) == (7, 1, 56)
    assert sched.state_dict()["last_epoch"] == 0  # restored to before the step
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
    with pytest.raises(ValueError, match=r"holds the state of \['scheduler'\] but this LoopState has none"):
        ksuit.LoopState().load_state_dict(state)
    with pytest.raises(TypeError, match="takes objects with state_dict"):
        ksuit.LoopState(scheduler=object())


def test_resume_on_a_fresh_run_changes_nothing(tmp_path):
    net, _, _, model, loop, _ = make(tmp_path)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert ksuit.resume(tmp_path / "run", model, loop) is None  # no folder yet
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert ksuit.resume(tmp_path / "run", model, loop) is None  # a folder without checkpoints
    assert loop.step == 0
    assert_bitwise_equal(dict(net.state_dict()), before)


def test_resume_of_a_model_with_no_set_of_its_own_starts_fresh(tmp_path):
    _, _, _, model, loop, writer = make(tmp_path)
    writer.save(model, "latest", trainer=loop)  # sets of 'lin' only
    net = nn.Linear(3, 1)
    other = ksuit.models.wrap(net, "other", optimizer=torch.optim.AdamW(net.parameters(), lr=0.1))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    other_loop = ksuit.LoopState()
    assert ksuit.resume(tmp_path / "run", other, other_loop) is None
    assert other_loop.step == 0
    assert_bitwise_equal(dict(net.state_dict()), before)


def test_resume_restores_weights_optimizer_and_loop_and_prefers_the_newest_set(tmp_path):
    net, opt, sched, model, loop, writer = make(tmp_path)
    for step in (1, 2, 3):
        net(torch.randn(4, 3)).sum().backward()
        opt.step()
        sched.step()
        loop.step = step
        writer.save(model, str(loop.cur_iteration) if step == 2 else "latest", trainer=loop)
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    net2, opt2, sched2, model2, loop2, _ = make(tmp_path)
    point = ksuit.resume(tmp_path / "run", model2, loop2)
    assert point.tag == "latest" and loop2.step == 3 and str(point.training_iteration) == "E0_U3_S0"
    assert_bitwise_equal(dict(net2.state_dict()), saved)
    assert_bitwise_equal(opt2.state_dict(), opt.state_dict())
    assert sched2.state_dict() == sched.state_dict()
    net3, _, _, model3, loop3, _ = make(tmp_path)
    assert ksuit.resume(tmp_path / "run", model3, loop3, checkpoint="update=2").tag == "E0_U2_S0"
    assert loop3.step == 2


def test_resume_scans_the_folder_once(tmp_path, monkeypatch):
    import ksuit.readers.sets as sets

    net, _, _, model, loop, writer = make(tmp_path)
    writer.save(model, "latest", trainer=loop)
    scans = []
    real_read = sets.read_folder
    monkeypatch.setattr(sets, "read_folder", lambda *a, **k: scans.append(1) or real_read(*a, **k))
    assert ksuit.resume(tmp_path / "run", model, make(tmp_path)[4]).tag == "latest"
    assert len(scans) == 1  # one listing and one read of the manifests decide fresh-or-not and the set


def test_resume_refuses_to_start_over_when_every_set_is_damaged(tmp_path):
    net, _, _, model, loop, writer = make(tmp_path)
    writer.save(model, "latest", trainer=loop)
    path = tmp_path / "run" / "checkpoints" / "lin_cp=latest_optim.th"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(FileNotFoundError, match=r"no usable checkpoint set of 'lin'.*lin_cp=latest_optim.th"):
        ksuit.resume(tmp_path / "run", model, make(tmp_path)[4])


def env() -> dict[str, str]:
    result = dict(os.environ)
    result["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), result.get("PYTHONPATH", "")])
    result["OMP_NUM_THREADS"] = "1"
    return result


@pytest.mark.slow
def test_sigkill_during_a_save_then_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    steps = 40
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(killed), str(steps), "--slow-saves"],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    files_written = 0
    while files_written < 7:  # three files per save: the 7th is the first one of the third save
        line = proc.stdout.readline()
        assert line, f"the worker ended early (exit {proc.wait()})"
        files_written += line.strip() == "in-save"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    folder = killed / "run" / "checkpoints"
    assert [p.name for p in folder.iterdir() if p.name.endswith(".tmp")], "the kill did not land in a save"
    assert load_file(folder / "mlp_cp=latest_trainer.th")["loop"]["step"] == 10  # the last complete save

    loop_worker.train(str(killed), steps)  # resumes from step 10
    reference = tmp_path / "reference"
    loop_worker.train(str(reference), steps)
    for role in ("model", "optim", "trainer"):
        a = load_file(reference / "run" / "checkpoints" / f"mlp_cp=latest_{role}.th")
        b = load_file(folder / f"mlp_cp=latest_{role}.th")
        if role == "model":
            a, b = a["state_dict"], b["state_dict"]
        assert_bitwise_equal(a, b, role)
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]
    result = CliRunner().invoke(app, ["verify", str(killed / "run")])
    assert result.exit_code == 0, result.output
