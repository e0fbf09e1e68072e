"""One set of rules for a trainer's settings: `BaseTrainer(...)` and the run config's `trainer:`
section validate through the same `TrainerSettings` model."""

import inspect
from pathlib import Path

import pytest

from ksuit.providers import PathProvider
from ksuit.schemas.run import ConfigError, TrainerConfig, load_run_config
from ksuit.trainers import BaseTrainer, TrainerSettings

TINY = Path(__file__).parents[1] / "e2e" / "tiny_autoencoder.yaml"
NOT_SETTINGS = {"self", "path_provider", "callbacks", "progress", "retention"}


def test_the_signature_and_the_config_have_exactly_the_settings():
    params = inspect.signature(BaseTrainer.__init__).parameters
    settings = TrainerSettings.model_fields
    assert set(params) - NOT_SETTINGS == set(settings)
    for name, field in settings.items():
        default = params[name].default
        if field.is_required():
            assert default is inspect.Parameter.empty, name
        else:
            assert default == field.default, name
    assert issubclass(TrainerConfig, TrainerSettings)
    assert set(TrainerConfig.model_fields) == set(settings) | {"kind"}


def test_valid_arguments_become_attributes(tmp_path):
    trainer = BaseTrainer(
        PathProvider(tmp_path, "r"), effective_batch_size=8, max_samples=100, precision="bfloat16", seed=3
    )
    assert str(trainer.end_iteration) == "S100"
    assert (trainer.precision, trainer.seed, trainer.device_name) == ("bfloat16", 3, "auto")


BAD = [
    ({"effective_batch_size": 0}, r"effective_batch_size: Input should be greater than 0 \(got 0\)"),
    ({"effective_batch_size": True}, r"effective_batch_size: Input should be a valid integer \(got True\)"),
    ({"effective_batch_size": 8.0}, r"effective_batch_size: Input should be a valid integer \(got 8.0\)"),
    ({"accumulation_steps": 0}, r"accumulation_steps: .* greater than 0"),
    ({"max_epochs": -1}, r"max_epochs: .* greater than 0 \(got -1\)"),
    ({"device": "tpu"}, r"device: Input should be 'auto', 'cpu' or 'cuda' \(got 'tpu'\)"),
    ({"precision": "fp8"}, r"precision: Input should be 'float32', 'bfloat16' or 'float16' \(got 'fp8'\)"),
    ({"num_workers": -1}, r"num_workers: .* greater than or equal to 0 \(got -1\)"),
    ({"num_threads": 0}, r"num_threads: .* greater than 0 \(got 0\)"),
    ({"clip_grad_norm": 0.0}, r"clip_grad_norm: .* greater than 0 \(got 0.0\)"),
    (
        {"checkpoint_format": "zip"},
        r"checkpoint_format: Input should be 'torch' or 'safetensors' \(got 'zip'\)",
    ),
    (
        {"max_updates": 3},
        r"exactly one of max_epochs, max_updates, max_samples \(given: max_epochs, max_updates\)",
    ),
    ({"max_epochs": None}, r"exactly one of max_epochs, max_updates, max_samples \(given: none\)"),
]


@pytest.mark.parametrize(
    ("change", "message"), BAD, ids=[f"{k}={v!r}" for change, _ in BAD for k, v in change.items()]
)
def test_bad_arguments_are_a_value_error_naming_the_setting(tmp_path, change, message):
    arguments = {"effective_batch_size": 8, "max_epochs": 1, **change}
    with pytest.raises(ValueError, match=message):
        BaseTrainer(PathProvider(tmp_path, "r"), **arguments)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.precision=fp8", r"tiny_autoencoder.yaml: trainer.precision: Input should be 'float32'"),
        ("trainer.clip_grad_norm=-1", r"trainer.clip_grad_norm: Input should be greater than 0"),
        (
            "trainer.max_updates=3",
            r"tiny_autoencoder.yaml: trainer: give exactly one of max_epochs, max_updates, max_samples "
            r"\(given: max_epochs, max_updates\) \(set by the command-line override "
            r"'trainer.max_updates=3'\)",
        ),
    ],
)
def test_the_config_applies_the_same_rules(override, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(TINY, [override])


def test_a_global_batch_the_processes_cannot_share_says_which_counts_can(tmp_path):
    from ksuit.trainers.loader import batch_error

    message = batch_error(12, 5, 1)
    assert "world size 5" in message and "divides 12 (1, 2, 3, 4, 6, 12)" in message
    assert "choose accumulation_steps that divides" in batch_error(12, 2, 5)
