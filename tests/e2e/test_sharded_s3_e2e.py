"""Sharded (FSDP2) training on S3 (moto over HTTP), with real torchrun processes (CPU, gloo):
2 ranks train with `--output s3://...` and stop after a few updates; the sharded set they
saved loads in one plain process equal to what they held (consolidated from the 2 ranks'
parts); a resume on 2 ranks from S3 ends bitwise equal to an uninterrupted run, and the run
verifies. A tiered run (local output, `trainer.checkpoint_mirror=s3://...`) resumes on a
machine without its local folder from the mirror, bitwise equal too."""

import shutil
from pathlib import Path

import pytest
import torch
from tests.conftest import assert_bitwise_equal
from tests.e2e.test_sharded_e2e import CONFIG, LEAVES, SAVED_AT
from tests.e2e.torchrun import run, torchrun
from typer.testing import CliRunner

from ksuit.cli import app
from ksuit.readers.model_loading import load_model, load_payload

pytestmark = pytest.mark.slow


def train(out: str, *options: str, **env: str) -> str:
    args = [
        "-m",
        "ksuit",
        "train",
        str(CONFIG),
        *options,
        "--output",
        out,
        "--run-id",
        "run",
        "--no-progress",
    ]
    return run(torchrun(2, *args), **env)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """What an uninterrupted 2-rank run holds at its end."""
    out = tmp_path_factory.mktemp("reference")
    train(str(out), KSUIT_TEST_DUMP=str(out / "dump"))
    return torch.load(out / "dump.after", weights_only=True)


def stop_early(out: str, dump: Path) -> None:
    train(out, "trainer.max_epochs=null", f"trainer.max_updates={SAVED_AT}", KSUIT_TEST_DUMP=str(dump))


def test_fsdp_on_2_ranks_saves_to_s3_loads_in_one_process_and_resumes_exactly(s3, tmp_path, reference):
    output = f"{s3.url}/runs"
    stop_early(output, tmp_path / "saved")
    saved = torch.load(tmp_path / "saved.after", weights_only=True)
    folder = f"{output}/run/checkpoints"
    for leaf in LEAVES:  # one plain process, no process group: the 2 ranks' parts consolidated
        assert_bitwise_equal(
            load_model(f"{folder}/{leaf}_cp=last_model.dcp").state_dict(), saved[leaf]["model"]
        )
        assert_bitwise_equal(load_payload(f"{folder}/{leaf}_cp=last_optim.dcp"), saved[leaf]["optim"], leaf)
    assert any("/__1_0.distcp" in k for k in s3.keys("runs/run/checkpoints/.ksuit/data/"))
    out = train(output, "--resume", KSUIT_TEST_DUMP=str(tmp_path / "resumed"))
    assert "resuming from checkpoint" in out and "will differ" not in out
    assert_bitwise_equal(torch.load(tmp_path / "resumed.after", weights_only=True), reference)
    result = CliRunner().invoke(app, ["verify", f"{output}/run"])
    assert result.exit_code == 0, result.output


def test_a_sharded_tiered_run_resumes_from_its_s3_mirror_without_the_local_copy(s3, tmp_path, reference):
    mirror = f"trainer.checkpoint_mirror={s3.url}/mirror"
    train(str(tmp_path / "local"), "trainer.max_epochs=null", f"trainer.max_updates={SAVED_AT}", mirror)
    assert any(k.endswith("_model.dcp/__1_0.distcp") for k in s3.keys("mirror/run/checkpoints/.ksuit/data/"))
    shutil.rmtree(tmp_path / "local")  # a new machine: only the mirror is left
    out = train(str(tmp_path / "local"), "--resume", mirror, KSUIT_TEST_DUMP=str(tmp_path / "resumed"))
    assert f"in{s3.url}/mirror/run/checkpoints" in "".join(out.split()), out  # the log wraps lines
    assert "will differ" not in out
    assert_bitwise_equal(torch.load(tmp_path / "resumed.after", weights_only=True), reference)
