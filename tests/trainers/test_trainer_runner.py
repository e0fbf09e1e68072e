from pathlib import Path

import pytest

from ksuit.schemas.run import ConfigError, load_run_config
from ksuit.trainers.runner import build_callbacks, build_model, prepare_run, run

TINY = Path(__file__).parents[1] / "e2e" / "tiny_autoencoder.yaml"


def test_build_model_gives_every_leaf_the_default_optimizer():
    model = build_model(
        load_run_config(TINY, ["model.decoder.optimizer_config={kind: torch.optim.SGD, lr: 0.5}"])
    )
    assert model.encoder.model_config.optimizer_config.kind == "torch.optim.AdamW"
    assert model.decoder.model_config.optimizer_config.kind == "torch.optim.SGD"
    assert model.model_config.optimizer_config is None  # the composite has none of its own
    assert model.encoder.model_config.input_dim == 8


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "model.encoder.hiden_dim=4",
            r"model.encoder.hiden_dim: unknown key 'hiden_dim'; did you mean 'hidden_dim'",
        ),
        ("model.kind=nowhere.Model", r"model.kind: .*cannot be imported"),
        ("optimizer.lrate=0.1", r"optimizer.lrate: unknown key 'lrate'"),
    ],
)
def test_model_section_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        build_model(load_run_config(TINY, [override]))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "callbacks.1.every_n_epoch=2",
            r"tiny_autoencoder.yaml: callbacks.1.every_n_epoch: unknown key "
            r"'every_n_epoch'; did you mean 'every_n_epochs'",
        ),
        (
            "callbacks.0.kind=validation",
            r"callbacks.0.kind: unknown kind 'validation'; use one of checkpoint",
        ),
        ("callbacks.3.metric_key=null", r"callbacks.3.metric_key:"),
        ("callbacks.1.every_n_epochs=0", r"callbacks.1: every_n_epochs must be a positive int"),
    ],
)
def test_callback_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        build_callbacks(load_run_config(TINY, [override]))


def test_unknown_data_kind_and_arguments(tmp_path):
    with pytest.raises(ConfigError, match="data.kind: unknown kind 'mnist'"):
        prepare_run(load_run_config(TINY, ["data={kind: mnist}"]), tmp_path, "r")
    with pytest.raises(ConfigError, match="data.samples: unknown key 'samples'"):
        prepare_run(load_run_config(TINY, ["data.samples=3"]), tmp_path, "r")


def test_new_run_refuses_an_existing_one_and_resume_needs_one(tmp_path):
    config = load_run_config(TINY, ["trainer.max_epochs=1"])
    with pytest.raises(FileNotFoundError, match="has no checkpoints"):
        prepare_run(config, tmp_path, "r", resume=True)
    with pytest.raises(ConfigError, match="give its --run-id"):
        prepare_run(config, tmp_path, None, resume=True)
    prepared = prepare_run(config, tmp_path, "r")
    run(prepared)
    assert (tmp_path / "r" / "config.yaml").exists()
    with pytest.raises(FileExistsError, match="already has checkpoints; continue it with --resume"):
        prepare_run(config, tmp_path, "r")


def test_generated_run_id(tmp_path):
    prepared = prepare_run(load_run_config(TINY), tmp_path)
    assert prepared.run_dir.parent == tmp_path and len(prepared.path_provider.run_id) > 10


def test_resume_warns_about_a_changed_config(tmp_path, caplog):
    run(prepare_run(load_run_config(TINY, ["trainer.max_epochs=1"]), tmp_path, "r"))
    resumed = prepare_run(load_run_config(TINY, ["trainer.max_epochs=2"]), tmp_path, "r", resume=True)
    with caplog.at_level("WARNING", logger="ksuit"):
        run(resumed)
    assert "differs from the one this run started with" in caplog.text
    assert "trainer.max_epochs: 1 -> 2" in caplog.text


def test_trainer_kind_must_override_loss(tmp_path):
    with pytest.raises(ConfigError, match="trainer.kind: BaseTrainer does not override loss"):
        prepare_run(load_run_config(TINY, ["trainer.kind=ksuit.trainers.BaseTrainer"]), tmp_path, "r")
