"""`ksuit export` writes a standalone file: it joins no set, so exporting the rolling `latest`
leaves the next save's set whole, and readers treat the copy as a file beside the set."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from tests.conftest import FakeTrainer, autoencoder_config, train_one_step
from typer.testing import CliRunner

from ksuit.cli import app
from ksuit.initializers import PreviousRunInitializer
from ksuit.readers import list_checkpoints, load_model, scan_sets, select_resume_set
from ksuit.storage import read_manifest
from ksuit.writers import CheckpointWriter
from ksuit.zoo.autoencoder import Autoencoder

runner = CliRunner()
LATEST_ENCODER = "autoencoder.encoder_cp=latest_model"


def save(writer, model, counter):
    writer.save(
        model,
        str(counter.cur_iteration),
        trainer=FakeTrainer(counter),
        save_latest_weights=True,
        save_latest_optim=True,
    )


def test_exporting_latest_then_saving_again_leaves_latest_resumable(path_provider, update_counter):
    model = Autoencoder(autoencoder_config()).initialize()
    writer = CheckpointWriter(path_provider, update_counter)
    train_one_step(model)
    update_counter.next_update()
    save(writer, model, update_counter)
    folder, run_dir = path_provider.checkpoint_path, path_provider.run_output_path
    result = runner.invoke(app, ["export", str(folder / f"{LATEST_ENCODER}.th"), "--to", "safetensors"])
    assert result.exit_code == 0, result.output
    exported = folder / f"{LATEST_ENCODER}.safetensors"
    old_weights = model.encoder.net[0].weight.detach().clone()

    train_one_step(model)
    update_counter.next_update()
    save(writer, model, update_counter)

    chosen, skipped = select_resume_set(run_dir, "autoencoder")
    assert (
        chosen.tag == "latest" and chosen.training_iteration == update_counter.cur_iteration and not skipped
    )
    assert exported.name not in chosen.files
    latest = read_manifest(folder / "autoencoder_cp=latest.manifest.json")
    assert exported.name not in latest.files and len(latest.iterations()) == 1
    assert all(s.ok for s in scan_sets(run_dir, checksum=True))
    verify = runner.invoke(app, ["verify", str(run_dir)])
    assert verify.exit_code == 0, verify.output
    # ls lists the copy as a file of its own (no manifest gives it an iteration)
    (info,) = [i for i in list_checkpoints(run_dir) if i.path == exported]
    assert info.format == "safetensors" and info.training_iteration is None
    assert torch.equal(load_model(exported).net[0].weight, old_weights)

    # a new run started from 'latest' gets the set's (newer) weights, not the stale export
    target = Autoencoder(autoencoder_config()).initialize()
    PreviousRunInitializer(run_dir, checkpoint="latest").apply(SimpleNamespace(model=target, rank=0))
    assert torch.equal(target.encoder.net[0].weight, model.encoder.net[0].weight)


def test_export_never_replaces_a_file_of_a_set(path_provider, update_counter):
    model = Autoencoder(autoencoder_config()).initialize()
    with CheckpointWriter(path_provider, update_counter, format="safetensors") as writer:
        writer.save(model, "E1_U20_S80", save_optim=False)
    folder = path_provider.checkpoint_path
    source = folder / "autoencoder.encoder_cp=E1_U20_S80_model.safetensors"
    member = folder / "autoencoder.decoder_cp=E2_U40_S160_model.th"
    CheckpointWriter(path_provider, update_counter).save(model, "E2_U40_S160", save_optim=False)
    before = member.read_bytes()
    result = runner.invoke(app, ["export", str(source), "--to", "torch", "--output", str(member), "--force"])
    assert result.exit_code == 2 and "belongs to the checkpoint set" in result.output
    assert member.read_bytes() == before
    assert all(s.ok for s in scan_sets(path_provider.run_output_path, checksum=True))


def test_export_checks_its_source_against_the_manifest(path_provider, update_counter):
    model = Autoencoder(autoencoder_config()).initialize()
    with CheckpointWriter(path_provider, update_counter) as writer:
        writer.save(model, "E1_U20_S80", save_optim=False)
    source = path_provider.checkpoint_path / "autoencoder.encoder_cp=E1_U20_S80_model.th"
    data = bytearray(source.read_bytes())
    data[data.find(model.encoder.net[0].weight.detach().numpy().tobytes()) + 2] ^= 0x01
    source.write_bytes(bytes(data))
    result = runner.invoke(app, ["export", str(source), "--to", "safetensors"])
    assert result.exit_code == 1 and "does not match the manifest" in result.output
    assert not source.with_suffix(".safetensors").exists()
