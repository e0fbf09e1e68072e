"""`ksuit export`: .th <-> .safetensors conversion, next to the source, atomically, bit for bit."""

import json

import pytest
import torch
from safetensors.torch import load_file as st_load_file
from tests.conftest import FakeTrainer, autoencoder_config, train_one_step
from typer.testing import CliRunner

from ksuit.cli import app
from ksuit.readers import load_model, scan_sets, select_resume_set
from ksuit.storage.loading import load_file
from ksuit.writers import CheckpointWriter
from ksuit.zoo.autoencoder import Autoencoder

runner = CliRunner()


def _bits(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.fixture
def run(path_provider, update_counter):
    model = Autoencoder(autoencoder_config()).initialize()
    train_one_step(model)
    with torch.no_grad():
        model.encoder.net[0].weight[:, :3] = torch.tensor([float("nan"), -0.0, 1e-45])  # odd bit patterns
    with CheckpointWriter(path_provider, update_counter) as writer:
        writer.save(model, "E1_U20_S80", trainer=FakeTrainer(update_counter))
    return path_provider.checkpoint_path, model


def test_export_round_trip_is_bitwise_equal(run):
    folder, model = run
    source = folder / "autoencoder.encoder_cp=E1_U20_S80_model.th"
    original = load_file(source)
    result = runner.invoke(app, ["export", str(source), "--to", "safetensors"])
    assert result.exit_code == 0, result.output
    st_path = folder / "autoencoder.encoder_cp=E1_U20_S80_model.safetensors"
    assert str(st_path) in result.output
    # a plain safetensors reader sees the tensors; ksuit sees the same dict as the .th file
    plain = st_load_file(str(st_path))
    for key, value in original["state_dict"].items():
        assert torch.equal(_bits(plain[key]), _bits(value)), key
    via_st = load_file(st_path)
    assert {k: v for k, v in via_st.items() if k != "state_dict"} == {
        k: v for k, v in original.items() if k != "state_dict"
    }
    # and back: a new .th (written elsewhere so it does not collide with the source)
    back = folder / "copy_cp=E1_U20_S80_model.th"
    result = runner.invoke(app, ["export", str(st_path), "--to", "torch", "--output", str(back)])
    assert result.exit_code == 0, result.output
    again = torch.load(back, weights_only=True)
    assert set(again["state_dict"]) == set(original["state_dict"])
    for key, value in original["state_dict"].items():
        assert again["state_dict"][key].dtype == value.dtype
        assert torch.equal(_bits(again["state_dict"][key]), _bits(value)), key
    assert json.dumps({k: v for k, v in again.items() if k != "state_dict"}, sort_keys=True) == json.dumps(
        {k: v for k, v in original.items() if k != "state_dict"}, sort_keys=True
    )
    rebuilt = load_model(st_path)
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(_bits(rebuilt.state_dict()[key]), _bits(value))


def test_exported_file_stays_beside_its_set_so_verify_and_resume_still_pass(run, path_provider):
    folder, _ = run
    source = folder / "autoencoder.decoder_cp=E1_U20_S80_model.th"
    assert runner.invoke(app, ["export", str(source), "--to", "safetensors"]).exit_code == 0
    (s,) = scan_sets(path_provider.run_output_path, checksum=True)
    assert s.ok, s.problems
    exported = "autoencoder.decoder_cp=E1_U20_S80_model.safetensors"
    assert exported not in s.manifest.files and exported in s.others and exported not in s.files
    chosen, skipped = select_resume_set(path_provider.run_output_path, "autoencoder")
    assert chosen.tag == "E1_U20_S80" and not skipped
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_export_refuses_what_it_cannot_do(run):
    folder, _ = run
    optim = folder / "autoencoder.encoder_cp=E1_U20_S80_optim.th"
    result = runner.invoke(app, ["export", str(optim), "--to", "safetensors"])
    assert result.exit_code == 2 and "format='torch'" in result.output
    assert not (folder / "autoencoder.encoder_cp=E1_U20_S80_optim.safetensors").exists()
    weights = folder / "autoencoder.encoder_cp=E1_U20_S80_model.th"
    result = runner.invoke(app, ["export", str(weights), "--to", "torch"])
    assert result.exit_code == 2 and "already in the torch format" in result.output
    result = runner.invoke(app, ["export", str(folder / "missing_cp=E1_model.th"), "--to", "safetensors"])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = runner.invoke(app, ["export", str(weights), "--to", "npz"])  # --to is an enum
    flat = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and "'npz' is not one of 'safetensors', 'torch'" in flat
    assert runner.invoke(app, ["export", str(weights), "--to", "safetensors"]).exit_code == 0
    result = runner.invoke(app, ["export", str(weights), "--to", "safetensors"])
    assert result.exit_code == 2 and "--force" in result.output
    assert runner.invoke(app, ["export", str(weights), "--to", "safetensors", "--force"]).exit_code == 0


def test_export_of_a_corrupt_file_exits_1(tmp_path):
    bad = tmp_path / "net_cp=E1_U0_S0_model.th"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    result = runner.invoke(app, ["export", str(bad), "--to", "safetensors"])
    assert result.exit_code == 1 and "corrupt" in result.output
    assert not (tmp_path / "net_cp=E1_U0_S0_model.safetensors").exists()
