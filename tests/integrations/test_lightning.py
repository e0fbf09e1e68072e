"""`KsuitCheckpointIO` with a real Lightning Trainer: atomic, checksummed, asynchronous `.ckpt`
files; top-k removal that never races a queued save; safe loading; resume after SIGKILL."""

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip(
    "lightning", reason="the lightning extra is not installed (pip install 'ksuit[lightning]')"
)

from ksuit.cli import app
from ksuit.integrations.lightning import KsuitCheckpointIO
from ksuit.storage import CorruptCheckpointError, UnsafeCheckpointError
from ksuit.storage.formats import TorchFormat
from tests.conftest import assert_bitwise_equal
from tests.integrations import lightning_app

ROOT = Path(__file__).resolve().parents[2]


def checkpoint(step: int = 1) -> dict:
    return {"state_dict": {"w": torch.full((3,), float(step))}, "epoch": 0, "global_step": step}


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_top_2_and_last_over_20_epochs_async_leave_exactly_those_files_each_verifying(tmp_path):
    model, trainer, checkpoints = lightning_app.fit(str(tmp_path), epochs=20, max_pending=2)
    top = sorted(Path(p).name for p in checkpoints.best_k_models)
    assert len(top) == 2 and "last.ckpt" not in top
    expected = [*top, "last.ckpt"]
    assert names(tmp_path) == sorted(expected + [f"lightning_cp={n}.manifest.json" for n in expected])
    result = CliRunner().invoke(app, ["verify", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "3 sets, 0 with problems" in result.output
    io = KsuitCheckpointIO()
    for name in expected:  # Lightning's own content loads with weights_only=True
        loaded = io.load_checkpoint(tmp_path / name)
        assert {"state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks"} <= set(loaded)
        assert loaded["hyper_parameters"] == {"lr": 0.05, "extra": None}


def test_a_removal_waits_for_a_queued_save_of_the_same_file(tmp_path, monkeypatch):
    """Lightning's AsyncCheckpointIO removes files its thread has yet to write (issue #14035),
    which then come back; here the removal runs after that save."""
    release = threading.Event()
    real_write = TorchFormat.write

    def blocked_write(self, payload, sink):
        release.wait(timeout=60)
        real_write(self, payload, sink)

    monkeypatch.setattr(TorchFormat, "write", blocked_write)
    io = KsuitCheckpointIO(async_save=True)
    io.save_checkpoint(checkpoint(), tmp_path / "epoch=0-step=1.ckpt")  # queued; its write is held
    assert not (tmp_path / "epoch=0-step=1.ckpt").exists()
    (sink,) = io._sinks.values()
    real_flush = sink.flush

    def flush():  # the write goes on once the removal waits for it
        release.set()
        real_flush()

    monkeypatch.setattr(sink, "flush", flush)
    io.remove_checkpoint(tmp_path / "epoch=0-step=1.ckpt")
    release.set()
    io.teardown()  # every write has ended: a removal that ran first would see the file back now
    assert names(tmp_path) == []


def test_a_changed_checkpoint_is_refused_and_a_foreign_one_loads_unverified(tmp_path, caplog):
    io = KsuitCheckpointIO()
    io.save_checkpoint(checkpoint(), tmp_path / "last.ckpt")
    data = bytearray((tmp_path / "last.ckpt").read_bytes())
    data[-40] ^= 0xFF
    (tmp_path / "last.ckpt").write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=r"last.ckpt does not match its manifest"):
        io.load_checkpoint(tmp_path / "last.ckpt")
    torch.save(checkpoint(7), tmp_path / "other.ckpt")  # e.g. written by TorchCheckpointIO
    with caplog.at_level(logging.WARNING):
        assert io.load_checkpoint(tmp_path / "other.ckpt")["global_step"] == 7
    assert "other.ckpt has no ksuit manifest" in caplog.text


def test_objects_beyond_plain_values_need_weights_only_false(tmp_path, caplog):
    io = KsuitCheckpointIO()
    content = {**checkpoint(), "hyper_parameters": {"root": Path("/data")}}
    with caplog.at_level(logging.WARNING):
        io.save_checkpoint(content, tmp_path / "last.ckpt")
    assert "checkpoint['hyper_parameters']['root']" in caplog.text and "weights_only=False" in caplog.text
    with pytest.raises(UnsafeCheckpointError, match=r"trainer.fit\(\.\.\., weights_only=False\)"):
        io.load_checkpoint(tmp_path / "last.ckpt")
    with pytest.raises(UnsafeCheckpointError):
        io.load_checkpoint(tmp_path / "last.ckpt", weights_only=None)  # torch's default: True
    assert io.load_checkpoint(tmp_path / "last.ckpt", weights_only=False)["hyper_parameters"] == {
        "root": Path("/data")
    }


def test_only_ckpt_files_and_no_per_save_storage_options(tmp_path):
    io = KsuitCheckpointIO()
    with pytest.raises(ValueError, match=r"'model.pt' is not one: name it with the .ckpt extension"):
        io.save_checkpoint(checkpoint(), tmp_path / "model.pt")
    with pytest.raises(TypeError, match=r"KsuitCheckpointIO\(storage_options=...\)"):
        io.save_checkpoint(checkpoint(), tmp_path / "last.ckpt", storage_options={"x": 1})
    assert names(tmp_path) == []


def env() -> dict[str, str]:
    result = dict(os.environ)
    result["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), result.get("PYTHONPATH", "")])
    result["OMP_NUM_THREADS"] = "1"
    return result


@pytest.mark.slow
def test_sigkill_during_a_save_then_fit_from_last_ends_equal_to_an_uninterrupted_run(tmp_path):
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    proc = subprocess.Popen(
        [sys.executable, lightning_app.__file__, str(killed), "20", "--slow-saves"],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    written = 0
    while written < 5:  # two files an epoch at first (a top-k one and last): the 5th is epoch 2's
        line = proc.stdout.readline()
        assert line, f"the run ended early (exit {proc.wait()})"
        written += line.strip() == "in-save"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert [n for n in names(killed) if n.endswith(".tmp")], "the kill did not land in a save"

    model, trainer, _ = lightning_app.fit(str(killed), epochs=20, ckpt_path="last")
    assert Path(trainer.ckpt_path).name == "last.ckpt"
    expected, _, _ = lightning_app.fit(str(reference), epochs=20)
    assert_bitwise_equal(dict(model.state_dict()), dict(expected.state_dict()))
    assert not [n for n in names(killed) if n.startswith(".")]
    assert len([n for n in names(killed) if n.endswith(".ckpt")]) == 3
    assert CliRunner().invoke(app, ["verify", str(killed)]).exit_code == 0
