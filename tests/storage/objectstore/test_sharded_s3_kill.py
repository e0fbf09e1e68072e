"""A process SIGKILLed in the middle of a sharded save to S3 (moto over HTTP), while the
multipart upload of a part is open: the previous set stays what every reader sees and loads,
and `ksuit verify --repair --grace 0` removes every part of the killed save and aborts its
upload."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ksuit.cli import app
from ksuit.readers import select_resume_set
from ksuit.readers.model_loading import load_payload
from ksuit.storage import open_backend
from tests.conftest import assert_bitwise_equal
from tests.storage.objectstore.sharded_kill_worker import MODEL, weights

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("sharded_kill_worker.py")


def test_a_kill_during_a_sharded_save_to_s3_leaves_the_previous_set_and_repair_cleans_up(s3):
    url = f"{s3.url}/runs/r/checkpoints"
    root = Path(__file__).resolve().parents[3]
    path = os.pathsep.join([str(root / "src"), str(root), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, **s3.env, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "committed", proc.stderr.read()
        committed = set(s3.keys("runs/"))
        assert proc.stdout.readline().strip() == "uploading", proc.stderr.read()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    leftovers = set(s3.keys("runs/")) - committed
    assert leftovers and all("/.ksuit/data/" in k for k in leftovers), (
        leftovers
    )  # the killed save's skeletons
    assert s3.uploads("runs/"), "the model part's multipart upload is open"
    assert open_backend(url).folders() == [MODEL, "big_cp=latest_optim.dcp"]
    assert_bitwise_equal(load_payload(f"{url}/{MODEL}"), weights(0))
    chosen, _ = select_resume_set(url, "big")
    assert chosen.tag == "latest"
    result = CliRunner().invoke(app, ["verify", f"{s3.url}/runs/r", "--repair", "--grace", "0"])
    assert result.exit_code == 0, result.output
    assert set(s3.keys("runs/")) == committed
    assert not s3.uploads("runs/")
    assert_bitwise_equal(load_payload(f"{url}/{MODEL}"), weights(0))
