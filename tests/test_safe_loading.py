"""A checkpoint whose unpickling would run code is refused everywhere ksuit loads files, with an
error naming the file, and its code never runs (the marker file it would create stays absent)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from ksuit.cli import app
from ksuit.readers import load_model, select_resume_set
from ksuit.storage import UnsafeCheckpointError, load_file, read_metadata
from ksuit.storage.local.safe_files import hash_regular_file as hash_file
from ksuit.storage.manifest import read_manifest
from tests.conftest import save_resumable_set


class Payload:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path, marker) -> None:
    """Overwrites a checkpoint with a malicious one that otherwise looks like a weights file, and
    rewrites the manifest entry so size and checksum match (an attacker controlling the folder)."""
    torch.save({"state_dict": {"w": torch.zeros(2)}, "training_iteration": Payload(marker)}, path)
    manifest_path = next(
        path.parent.glob(f"*_cp={path.name.split('_cp=')[1].rsplit('_', 1)[0]}.manifest.json")
    )
    manifest = read_manifest(manifest_path)
    size, digest = hash_file(path)
    manifest.files[path.name].size = size
    manifest.files[path.name].checksum = digest
    manifest_path.write_text(manifest.to_json())


@pytest.fixture
def run(path_provider, update_counter):
    save_resumable_set(path_provider, update_counter)
    return path_provider.run_output_path, path_provider.checkpoint_path


def test_the_payload_really_runs_code_when_loaded_unsafely(tmp_path):
    # guards the test itself: with weights_only=False the marker would appear
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.th"
    torch.save({"x": Payload(marker)}, path)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_load_file_refuses_and_names_the_file(run, tmp_path):
    _, folder = run
    marker = tmp_path / "pwned"
    target = folder / "autoencoder.encoder_cp=latest_model.th"
    plant(target, marker)
    with pytest.raises(UnsafeCheckpointError, match="autoencoder.encoder_cp=latest_model.th") as info:
        load_file(target)
    assert "weights_only=True" in str(info.value)
    with pytest.raises(UnsafeCheckpointError, match="latest_model.th"):
        read_metadata(target)
    assert not marker.exists()


def test_load_model_refuses(run, tmp_path):
    _, folder = run
    marker = tmp_path / "pwned"
    target = folder / "autoencoder.decoder_cp=E0_U1_S0_model.th"
    plant(target, marker)
    with pytest.raises(UnsafeCheckpointError, match="autoencoder.decoder_cp=E0_U1_S0_model.th"):
        load_model(target)
    assert not marker.exists()


def test_resume_loading_refuses_a_planted_trainer_file(run, tmp_path):
    run_dir, folder = run
    marker = tmp_path / "pwned"
    target = folder / "autoencoder_cp=latest_trainer.th"
    plant(target, marker)
    chosen, _ = select_resume_set(run_dir, "autoencoder")  # checksums match: the set looks whole
    with pytest.raises(UnsafeCheckpointError, match="autoencoder_cp=latest_trainer.th"):
        for info in chosen.files.values():
            load_file(info.path)
    assert not marker.exists()


def test_cli_inspect_and_verify_refuse(run, tmp_path):
    run_dir, folder = run
    marker = tmp_path / "pwned"
    target = folder / "autoencoder.encoder_cp=E0_U1_S0_optim.th"
    plant(target, marker)
    runner = CliRunner()
    result = runner.invoke(app, ["inspect", str(target)])
    assert result.exit_code == 1, result.output
    assert "autoencoder.encoder_cp=E0_U1_S0_optim.th" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["verify", str(run_dir)])
    assert result.exit_code == 1, result.output
    assert "autoencoder.encoder_cp=E0_U1_S0_optim.th" in result.output
    assert "refusing to load" in result.output
    assert not marker.exists()


@pytest.mark.slow
def test_cli_verify_subprocess_refuses(run, tmp_path):
    run_dir, folder = run
    marker = tmp_path / "pwned"
    plant(folder / "autoencoder_cp=E0_U1_S0_trainer.th", marker)
    proc = subprocess.run(
        [sys.executable, "-m", "ksuit", "verify", str(run_dir)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "autoencoder_cp=E0_U1_S0_trainer.th" in proc.stdout
    assert not marker.exists()
