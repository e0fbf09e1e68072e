"""`load_model` and `PreviousRunInitializer` check a file against the manifest that lists it:
a flipped bit or a changed size is a `CorruptCheckpointError` naming the file and the manifest,
not a model with silently wrong weights."""

from __future__ import annotations

import logging
import shutil
from types import SimpleNamespace

import pytest
import torch

from ksuit.initializers import PreviousRunInitializer
from ksuit.readers import load_model, load_model_payload
from ksuit.storage import CorruptCheckpointError
from ksuit.writers import CheckpointWriter
from ksuit.zoo.autoencoder import Autoencoder
from tests.conftest import FakeTrainer, autoencoder_config, train_one_step

ENCODER = "autoencoder.encoder_cp=E1_U20_S80_model.th"
MANIFEST = "autoencoder_cp=E1_U20_S80.manifest.json"


@pytest.fixture
def run(path_provider, update_counter):
    model = Autoencoder(autoencoder_config()).initialize()
    train_one_step(model)
    with CheckpointWriter(path_provider, update_counter) as writer:
        writer.save(model, "E1_U20_S80", trainer=FakeTrainer(update_counter))
    return path_provider.checkpoint_path, model


def flip_a_weight_bit(path, tensor):
    """Flips one bit inside the stored bytes of `tensor`: the file keeps its size and still loads."""
    data = bytearray(path.read_bytes())
    at = data.find(tensor.detach().contiguous().numpy().tobytes())
    assert at > 0
    data[at + 1] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_a_listed_file_is_refused_by_load_model(run):
    folder, model = run
    path = folder / ENCODER
    assert torch.equal(load_model(path).net[0].weight, model.encoder.net[0].weight)
    flip_a_weight_bit(path, model.encoder.net[0].weight)
    with pytest.raises(CorruptCheckpointError) as info:
        load_model(path)
    message = str(info.value)
    assert ENCODER in message and MANIFEST in message and "checksum" in message and "ksuit verify" in message
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        load_model_payload(path)
    # verify=False skips the checksum (the size still has to match)
    assert not torch.equal(load_model(path, verify=False).net[0].weight, model.encoder.net[0].weight)


def test_a_listed_file_of_another_size_is_refused(run):
    folder, _ = run
    path = folder / ENCODER
    with path.open("ab") as f:
        f.write(b"\0" * 16)  # a zip still loads with bytes appended
    with pytest.raises(CorruptCheckpointError, match=r"size \d+ != \d+ in manifest"):
        load_model(path)


def test_files_no_manifest_lists_load_unchecked(run, tmp_path, caplog):
    folder, model = run
    copy = tmp_path / "elsewhere" / ENCODER
    copy.parent.mkdir()
    shutil.copy(folder / ENCODER, copy)
    flip_a_weight_bit(copy, model.encoder.net[0].weight)
    assert load_model(copy) is not None  # standalone: nothing to check it against
    # an unreadable manifest of another tag does not stop a listed file from loading, nor warn
    (folder / "autoencoder_cp=E9_U9_S9.manifest.json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert torch.equal(load_model(folder / ENCODER).net[0].weight, model.encoder.net[0].weight)
    assert "cannot check" not in caplog.text


def test_previous_run_initializer_refuses_a_file_that_no_longer_matches(run, path_provider):
    folder, model = run
    target = Autoencoder(autoencoder_config()).initialize()
    trainer = SimpleNamespace(model=target, rank=0)
    PreviousRunInitializer(path_provider.run_output_path, checkpoint="E1_U20_S80").apply(trainer)
    assert torch.equal(target.encoder.net[0].weight, model.encoder.net[0].weight)
    flip_a_weight_bit(folder / ENCODER, model.encoder.net[0].weight)
    fresh = Autoencoder(autoencoder_config()).initialize()
    before = fresh.encoder.net[0].weight.clone()
    with pytest.raises(CorruptCheckpointError, match=f"{ENCODER}.*{MANIFEST}"):
        PreviousRunInitializer(path_provider.run_output_path, checkpoint="E1_U20_S80").apply(
            SimpleNamespace(model=fresh, rank=0)
        )
    assert torch.equal(fresh.encoder.net[0].weight, before)


def test_a_listed_file_too_damaged_to_load_reports_the_manifest_difference(run):
    """The file is hashed while it is loaded: when the load itself fails on a file that differs
    from its manifest, the error says so (the damage), not what the loader tripped on."""
    folder, _ = run
    path = folder / ENCODER
    data = bytearray(path.read_bytes())
    data[:64] = b"\xff" * 64  # the zip's first local header: no loader reads this file
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="checksum") as info:
        load_model(path)
    assert MANIFEST in str(info.value)
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        load_model_payload(path)
