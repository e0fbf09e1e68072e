from pathlib import Path

import pytest

from ksuit.schemas.run import ConfigError, apply_overrides, load_run_config, parse_yaml, run_config_from_dict

TINY = Path(__file__).parents[1] / "e2e" / "tiny_autoencoder.yaml"
EXAMPLE = Path(__file__).parents[2] / "examples" / "autoencoder.yaml"


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_the_example_and_the_tiny_config_validate():
    for path in (EXAMPLE, TINY):
        config = load_run_config(path)
        assert config.model.kind == "ksuit.zoo.autoencoder.Autoencoder"
        assert config.source == str(path)
    assert load_run_config(EXAMPLE).trainer.max_epochs >= 20


def test_unknown_key_names_the_key_the_file_and_a_suggestion(tmp_path):
    path = write(tmp_path, "model: {kind: a.B}\ntrainer: {effective_batch_size: 8, max_epoch: 3}\n")
    with pytest.raises(ConfigError) as info:
        load_run_config(path)
    message = str(info.value)
    assert f"{path}: trainer.max_epoch: unknown key 'max_epoch'; did you mean 'max_epochs'?" in message
    assert "known: accumulation_steps" in message


def test_top_level_typo_and_missing_section(tmp_path):
    path = write(tmp_path, "modle: {kind: a.B}\ntrainer: {effective_batch_size: 8, max_epochs: 1}\n")
    message = str(pytest.raises(ConfigError, load_run_config, path).value)
    assert "modle: unknown key 'modle'; did you mean 'model'?" in message
    assert "model: missing required key" in message


def test_wrong_types_are_named(tmp_path):
    path = write(
        tmp_path,
        "model: {kind: a.B}\ntrainer: {effective_batch_size: eight, max_epochs: 1, precision: fp8}\n",
    )
    message = str(pytest.raises(ConfigError, load_run_config, path).value)
    assert "trainer.effective_batch_size:" in message and "'eight'" in message
    assert "trainer.precision:" in message


def test_overrides_set_nested_keys_and_list_items():
    config = load_run_config(
        TINY,
        ["trainer.max_epochs=7", "callbacks.1.every_n_epochs=5", "optimizer.lr=1e-3", "data.num_samples=40"],
    )
    assert config.trainer.max_epochs == 7
    assert config.callbacks[1].kwargs["every_n_epochs"] == 5
    assert config.optimizer.kwargs["lr"] == pytest.approx(1e-3)  # YAML 1.2 floats: 1e-3 is a number
    assert config.data.kwargs["num_samples"] == 40
    assert config.override_paths["trainer.max_epochs"] == "trainer.max_epochs=7"


def test_override_errors_name_the_override():
    with pytest.raises(
        ConfigError,
        match=r"trainer.max_epoch: unknown key .*set by the command-line override "
        r"'trainer.max_epoch=3'",
    ):
        load_run_config(TINY, ["trainer.max_epoch=3"])
    with pytest.raises(ConfigError, match="is not KEY=VALUE"):
        load_run_config(TINY, ["trainer.max_epochs"])
    with pytest.raises(ConfigError, match="out of range"):
        load_run_config(TINY, ["callbacks.9.every_n_epochs=1"])
    with pytest.raises(ConfigError, match="indexes a list"):
        load_run_config(TINY, ["callbacks.first.every_n_epochs=1"])


def test_apply_overrides_values_are_yaml():
    raw = {"a": {"b": 1}, "l": [1, 2]}
    apply_overrides(raw, ["a.c=[x, y]", "l.1=true", "new.key=null"])
    assert raw == {"a": {"b": 1, "c": ["x", "y"]}, "l": [1, True], "new": {"key": None}}


def test_bad_yaml_and_bad_shapes(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_yaml("a: [1", "x.yaml")
    with pytest.raises(ConfigError, match="is a mapping"):
        run_config_from_dict([1, 2])
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "missing.yaml")
