import json
import logging
import os
from pathlib import Path

import pytest
import torch

import ksuit
from ksuit.writers import CheckpointKeys, CheckpointWriter
from ksuit.writers.checkpoint_writer import CheckpointKeys as KeysFromModule
from ksuit.writers.checkpoint_writer import CheckpointWriter as WriterFromModule
from ksuit.zoo.autoencoder import Autoencoder, EncoderConfig
from tests.conftest import FakeTrainer, autoencoder_config, train_one_step, written_files


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.endswith(".th")} if folder.exists() else set()


def _advance(uc, epochs=1):
    for _ in range(epochs):
        for _ in range(uc.updates_per_epoch):
            uc.next_update()
            uc.add_samples(uc.effective_batch_size)
        uc.next_epoch()


@pytest.fixture
def model():
    m = Autoencoder(autoencoder_config()).initialize()
    train_one_step(m)
    return m


def test_public_import_paths():
    assert CheckpointWriter is WriterFromModule is ksuit.CheckpointWriter
    assert CheckpointKeys is KeysFromModule is ksuit.CheckpointKeys


def test_checkpoint_keys_values():
    assert {k.name: k.value for k in CheckpointKeys} == {
        "STATE_DICT": "state_dict",
        "CHECKPOINT_TAG": "checkpoint_tag",
        "TRAINING_ITERATION": "training_iteration",
        "RUN_ID": "run_id",
        "MODEL_CONFIG": "model_config",
        "CONFIG_KIND": "config_kind",
        "CALLBACK_STATE_DICTS": "callback_state_dicts",
        "GRAD_SCALER": "grad_scaler",
    }
    assert CheckpointKeys.STATE_DICT == "state_dict"
    assert CheckpointKeys.STATE_DICT.__doc__ is not None or CheckpointKeys.__doc__


def test_writer_attributes(path_provider, update_counter):
    w = CheckpointWriter(path_provider, update_counter)
    assert w.path_provider is path_provider
    assert w.update_counter is update_counter
    assert isinstance(w.logger, logging.Logger)


def test_seed_autoencoder_scenario(path_provider, update_counter, model):
    """Encoder weights every 10 epochs, latest weights+optim of both submodels."""
    w = CheckpointWriter(path_provider, update_counter)
    for epoch in range(1, 31):
        _advance(update_counter)
        if epoch % 10 == 0:
            w.save(
                model, str(update_counter.cur_iteration), save_optim=False, model_names_to_save=["encoder"]
            )
        w.save(
            model,
            "latest",
            save_weights=False,
            save_optim=False,
            save_latest_weights=True,
            save_latest_optim=True,
        )
    w.save(model, "last", save_weights=True, save_optim=True, model_names_to_save=["encoder"])
    assert _files(path_provider.checkpoint_path) == {
        "autoencoder.encoder_cp=E10_U200_S800_model.th",
        "autoencoder.encoder_cp=E20_U400_S1600_model.th",
        "autoencoder.encoder_cp=E30_U600_S2400_model.th",
        "autoencoder.encoder_cp=latest_model.th",
        "autoencoder.encoder_cp=latest_optim.th",
        "autoencoder.decoder_cp=latest_model.th",
        "autoencoder.decoder_cp=latest_optim.th",
        "autoencoder.encoder_cp=last_model.th",
        "autoencoder.encoder_cp=last_optim.th",
    }


def test_model_file_payload(path_provider, update_counter, model):
    _advance(update_counter, 3)
    w = CheckpointWriter(path_provider, update_counter)
    w.save(model, "E3_U60_S240", save_latest_weights=True)
    folder = path_provider.checkpoint_path
    for tag in ("E3_U60_S240", "latest"):
        payload = torch.load(folder / f"autoencoder.encoder_cp={tag}_model.th", weights_only=True)
        assert set(payload) == {
            "state_dict",
            "checkpoint_tag",
            "training_iteration",
            "run_id",
            "model_config",
            "config_kind",
        }
        assert payload["checkpoint_tag"] == tag
        assert payload["training_iteration"] == {"epoch": 3, "update": 60, "sample": 240}
        assert payload["run_id"] == "run1"
        assert payload["config_kind"] == "ksuit.zoo.autoencoder.EncoderConfig"
        assert payload["model_config"] == model.encoder.model_config.model_dump(mode="json")
        assert payload["model_config"]["kind"] == "ksuit.zoo.autoencoder.Encoder"
        for key, value in model.encoder.state_dict().items():
            assert torch.equal(payload["state_dict"][key], value)
    optim = torch.load(folder / "autoencoder.decoder_cp=E3_U60_S240_optim.th", weights_only=True)
    reference = model.decoder.optimizer.state_dict()
    assert optim.keys() == reference.keys()
    assert torch.equal(optim["state"][0]["exp_avg"], reference["state"][0]["exp_avg"])
    assert optim["param_groups"] == reference["param_groups"]


def test_trainer_files(path_provider, update_counter, model):
    trainer = FakeTrainer(update_counter)
    w = CheckpointWriter(path_provider, update_counter)
    w.save(model, "E0_U0_S0", trainer=trainer, save_latest_weights=True, save_latest_optim=True)
    folder = path_provider.checkpoint_path
    for tag in ("E0_U0_S0", "latest"):
        state = torch.load(folder / f"autoencoder_cp={tag}_trainer.th", weights_only=True)
        assert state["callback_state_dicts"] == {"cb": {"best": 0.5}}
        assert state["training_iteration"] == {"epoch": 0, "update": 0, "sample": 0}
    assert trainer.calls == 1


def test_save_flags(path_provider, update_counter, model):
    w = CheckpointWriter(path_provider, update_counter)
    w.save(model, "a", save_weights=False, save_optim=True)
    w.save(model, "b", save_weights=True, save_optim=False)
    assert _files(path_provider.checkpoint_path) == {
        "autoencoder.encoder_cp=a_optim.th",
        "autoencoder.decoder_cp=a_optim.th",
        "autoencoder.encoder_cp=b_model.th",
        "autoencoder.decoder_cp=b_model.th",
    }


def test_latest_is_overwritten(path_provider, update_counter, model):
    w = CheckpointWriter(path_provider, update_counter)
    w.save(model, "E0_U0_S0", save_weights=False, save_optim=False, save_latest_weights=True)
    _advance(update_counter)
    with torch.no_grad():
        model.encoder.net[0].weight.add_(1.0)
    w.save(model, "E1_U20_S80", save_weights=False, save_optim=False, save_latest_weights=True)
    payload = torch.load(
        path_provider.checkpoint_path / "autoencoder.encoder_cp=latest_model.th", weights_only=True
    )
    assert payload["training_iteration"]["epoch"] == 1
    assert torch.equal(payload["state_dict"]["net.0.weight"], model.encoder.net[0].weight)
    assert _files(path_provider.checkpoint_path) == {
        "autoencoder.encoder_cp=latest_model.th",
        "autoencoder.decoder_cp=latest_model.th",
    }


def test_frozen_weights_skipped_on_request(path_provider, update_counter):
    model = Autoencoder(autoencoder_config(freeze_encoder=True)).initialize()
    w = CheckpointWriter(path_provider, update_counter)
    w.save(model, "x", save_frozen_weights=False)
    w.save(model, "y")
    assert _files(path_provider.checkpoint_path) == {
        "autoencoder.decoder_cp=x_model.th",
        "autoencoder.decoder_cp=x_optim.th",
        "autoencoder.encoder_cp=y_model.th",  # frozen: weights but no optimizer
        "autoencoder.decoder_cp=y_model.th",
        "autoencoder.decoder_cp=y_optim.th",
    }


def test_single_model(path_provider, update_counter):
    enc = ksuit.zoo.Encoder(
        EncoderConfig(optimizer_config={"kind": "torch.optim.SGD", "lr": 0.1})
    ).initialize()
    w = CheckpointWriter(path_provider, update_counter)
    w.save(enc, "last", model_names_to_save=["encoder"])
    assert _files(path_provider.checkpoint_path) == {"encoder_cp=last_model.th", "encoder_cp=last_optim.th"}


@pytest.mark.parametrize("names", [["encoder"], ["autoencoder.encoder"]])
def test_model_names_accept_keys_and_full_names(path_provider, update_counter, model, names):
    CheckpointWriter(path_provider, update_counter).save(
        model, "t", save_optim=False, model_names_to_save=names
    )
    assert _files(path_provider.checkpoint_path) == {"autoencoder.encoder_cp=t_model.th"}


def test_unknown_model_name_lists_valid_and_writes_nothing(path_provider, update_counter, model):
    w = CheckpointWriter(path_provider, update_counter)
    with pytest.raises(ValueError, match=r"unknown submodel 'encodr'.*known: .*decoder.*encoder"):
        w.save(model, "t", model_names_to_save=["encodr"])
    assert written_files(path_provider) == []


@pytest.mark.parametrize("tag", ["", "a/b", "../x", "x\0", ".hidden"])
def test_bad_tags_rejected_before_writing(path_provider, update_counter, model, tag):
    w = CheckpointWriter(path_provider, update_counter)
    with pytest.raises(ValueError, match="tag"):
        w.save(model, tag)
    with pytest.raises(ValueError, match="tag"):
        w.save_model_checkpoint("x_cp=a_model.th", model.encoder.state_dict(), tag)
    assert written_files(path_provider) == []


@pytest.mark.parametrize("name", ["", "../evil.th", "sub/evil.th", "/abs.th", "a\0.th"])
def test_bad_output_names_rejected(path_provider, update_counter, model, name):
    w = CheckpointWriter(path_provider, update_counter)
    with pytest.raises(ValueError, match="output_name"):
        w.save_model_checkpoint(name, model.encoder.state_dict(), "latest")
    assert written_files(path_provider) == []
    assert not (path_provider.checkpoint_path.parent / "evil.th").exists()


def test_save_model_checkpoint_payload_and_extra(path_provider, update_counter, model):
    w = CheckpointWriter(path_provider, update_counter)
    w.save_model_checkpoint(
        "enc_ema=0.99_cp=latest_model.th",
        model.encoder.state_dict(),
        "latest",
        model.encoder.model_config,
        ema_factor=0.99,
    )
    w.save_model_checkpoint("plain.th", {"w": torch.ones(2)}, "latest")
    folder = path_provider.checkpoint_path
    payload = torch.load(folder / "enc_ema=0.99_cp=latest_model.th", weights_only=True)
    assert payload["ema_factor"] == 0.99
    assert payload["config_kind"] == "ksuit.zoo.autoencoder.EncoderConfig"
    plain = torch.load(folder / "plain.th", weights_only=True)
    assert "model_config" not in plain and "config_kind" not in plain
    assert set(plain) == {"state_dict", "checkpoint_tag", "training_iteration", "run_id"}


def test_model_config_dump_failure_is_runtime_error(path_provider, update_counter, model, monkeypatch):
    cfg = model.encoder.model_config

    def boom(*a, **k):
        raise ValueError("cannot serialize")

    monkeypatch.setattr(type(cfg), "model_dump", boom)
    with pytest.raises(RuntimeError, match="model_config"):
        CheckpointWriter(path_provider, update_counter).save_model_checkpoint("e.th", {}, "latest", cfg)


@pytest.mark.parametrize(
    ("state_dict", "match"),
    [
        ([1, 2], "must be a dict"),
        ({1: torch.ones(1)}, "must be str"),
        ({"w": object()}, "plain Python"),
        ({"w": {"nested": Path("/x")}}, "PosixPath"),
    ],
)
def test_bad_state_dicts_rejected(path_provider, update_counter, state_dict, match):
    w = CheckpointWriter(path_provider, update_counter)
    with pytest.raises(TypeError, match=match):
        w.save_model_checkpoint("x.th", state_dict, "latest")
    assert written_files(path_provider) == []


def test_trainer_state_with_objects_rejected(path_provider, update_counter, model):
    class BadTrainer:
        def state_dict(self):
            return {"callback_state_dicts": {"cb": object()}}

    with pytest.raises(TypeError, match=r"trainer.state_dict\(\)\['callback_state_dicts'\]\['cb'\]"):
        CheckpointWriter(path_provider, update_counter).save(model, "t", trainer=BadTrainer())
    assert written_files(path_provider) == []


def test_ddp_model_rejected(path_provider, update_counter, model, monkeypatch):
    class FakeDDP(torch.nn.parallel.DistributedDataParallel):
        def __init__(self, module):
            torch.nn.Module.__init__(self)
            self.module = module

    with pytest.raises(TypeError, match=r"\.module"):
        CheckpointWriter(path_provider, update_counter).save(FakeDDP(model), "t")


def test_only_rank_zero_writes_but_trainer_state_collected(path_provider, update_counter, model, monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: 1)
    trainer = FakeTrainer(update_counter)
    w = CheckpointWriter(path_provider, update_counter)
    w.save(model, "t", trainer=trainer)
    w.save_model_checkpoint("x.th", {"w": torch.ones(1)}, "t")
    assert trainer.calls == 1
    assert written_files(path_provider) == []


def test_one_log_line_per_file(path_provider, update_counter, model, caplog):
    caplog.set_level(logging.INFO, logger="ksuit.writers.checkpoint_writer")
    CheckpointWriter(path_provider, update_counter).save(model, "t", trainer=FakeTrainer(update_counter))
    lines = [r.getMessage() for r in caplog.records if r.name == "ksuit.writers.checkpoint_writer"]
    assert len(lines) == 5
    for line in lines:
        assert str(path_provider.checkpoint_path) in line and "bytes" in line and "s)" in line


def test_manifest_lists_every_file_of_the_set(path_provider, update_counter, model):
    CheckpointWriter(path_provider, update_counter).save(model, "t", trainer=FakeTrainer(update_counter))
    manifest = json.loads((path_provider.checkpoint_path / "autoencoder_cp=t.manifest.json").read_text())
    assert set(manifest["files"]) == _files(path_provider.checkpoint_path)
    for name, entry in manifest["files"].items():
        assert entry["size"] == os.path.getsize(path_provider.checkpoint_path / name)
        assert entry["training_iteration"] == {"epoch": 0, "update": 0, "sample": 0}


def test_constructor_validates(path_provider, update_counter):
    with pytest.raises(TypeError, match="PathProvider"):
        CheckpointWriter("/tmp/x", update_counter)
    with pytest.raises(TypeError, match="UpdateCounter"):
        CheckpointWriter(path_provider, 3)
    with pytest.raises(ValueError, match="format"):
        CheckpointWriter(path_provider, update_counter, format="pickle")


def test_batch_commits_several_saves_as_one_switch(path_provider, update_counter, model, monkeypatch):
    from ksuit.storage import sets as transaction

    switches = []
    original = transaction.SetWriter.write_set

    def counting(self, files, run_id=None, on_written=None):
        switches.append(sorted(f.filename for f in files))
        return original(self, files, run_id, on_written)

    monkeypatch.setattr(transaction.SetWriter, "write_set", counting)
    w = CheckpointWriter(path_provider, update_counter)
    folder = path_provider.checkpoint_path
    with w.batch():
        w.save(model, "latest", trainer=FakeTrainer(update_counter))
        w.save_model_checkpoint(
            "autoencoder.encoder_ema=0.9_cp=latest_model.th", model.encoder.state_dict(), "latest"
        )
        w.save(model, "latest", save_optim=False)  # same files again: written once
        assert _files(folder) == set()  # nothing before the block ends
    assert len(switches) == 1
    assert switches[0] == sorted(set(switches[0]))
    assert len(switches[0]) == 6
    assert (folder / "autoencoder.encoder_ema=0.9_cp=latest.manifest.json").exists()
    assert (folder / "autoencoder_cp=latest.manifest.json").exists()


def test_batch_writes_nothing_when_the_block_fails(path_provider, update_counter, model):
    w = CheckpointWriter(path_provider, update_counter)
    with pytest.raises(KeyError):
        with w.batch():
            w.save(model, "latest")
            raise KeyError("boom")
    assert written_files(path_provider) == []
    w.save(model, "after")  # the writer is usable afterwards
    assert len(_files(path_provider.checkpoint_path)) == 4
