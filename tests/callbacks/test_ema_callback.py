from pathlib import Path

import pytest
import torch
from tests.conftest import assert_bitwise_equal

from ksuit.callbacks import Callback, EmaCallback
from ksuit.layout import EXTENSIONS
from ksuit.schemas.run import load_run_config
from ksuit.storage import load_file
from ksuit.trainers.runner import prepare_run, run

TINY = Path(__file__).parents[1] / "e2e" / "tiny_autoencoder.yaml"


class RecordWeights(Callback):
    def __init__(self):
        super().__init__("record")
        self.history = []

    def before_training(self, trainer):
        self.history.append({k: v.clone() for k, v in trainer.model.encoder.state_dict().items()})

    def after_update(self, trainer):
        self.history.append({k: v.clone() for k, v in trainer.model.encoder.state_dict().items()})


def test_ema_follows_the_formula_and_is_saved(tmp_path):
    prepared = prepare_run(
        load_run_config(
            TINY,
            [
                "trainer.max_epochs=null",
                "trainer.max_updates=5",
                "callbacks=[{kind: ema, target_factors: [0.9, 0.5], model_names: [encoder], "
                "every_n_updates: 2}]",
            ],
        ),
        tmp_path,
        "run",
    )
    record = RecordWeights()
    prepared.trainer.callbacks.insert(0, record)
    run(prepared)
    for factor in (0.9, 0.5):
        expected = {k: v.clone() for k, v in record.history[0].items()}
        for step in record.history[1:]:
            for k in expected:
                expected[k] = factor * expected[k] + (1 - factor) * step[k]
        folder = prepared.path_provider.checkpoint_path
        saved = load_file(folder / f"autoencoder.encoder_ema={factor}_cp=last_model.th")
        assert saved["ema_factor"] == factor and saved["checkpoint_tag"] == "last"
        assert saved["config_kind"] == "ksuit.zoo.autoencoder.EncoderConfig"
        for k in expected:
            torch.testing.assert_close(saved["state_dict"][k], expected[k], rtol=1e-5, atol=1e-6)
        assert (folder / f"autoencoder.encoder_ema={factor}_cp=E0_U4_S32_model.th").exists()
        assert (folder / f"autoencoder.encoder_ema={factor}_cp=E0_U4_S32.manifest.json").exists()
        assert not (folder / f"autoencoder.decoder_ema={factor}_cp=last_model.th").exists()


def test_ema_checks_its_arguments():
    for bad in ([], [1.0], [0.0], [0.9, 0.9]):
        with pytest.raises(ValueError, match="target_factors"):
            EmaCallback(bad)
    assert EmaCallback(0.99).target_factors == [0.99]


# (format of the stopped run, format of the resumed run): EMA files follow the checkpoint format,
# and a resume reads them in either
@pytest.mark.parametrize(
    ("stopped_format", "resumed_format"),
    [("torch", "torch"), ("safetensors", "safetensors"), ("torch", "safetensors")],
)
def test_ema_resumes_from_the_file_written_with_latest(tmp_path, caplog, stopped_format, resumed_format):
    overrides = [
        "callbacks=[{kind: checkpoint, every_n_updates: 3, save_weights: false, save_optim: false, "
        "save_latest_weights: true, save_latest_optim: true}, {kind: ema, target_factors: [0.9]}]"
    ]
    resumed_overrides = [*overrides, f"trainer.checkpoint_format={resumed_format}"]
    reference = prepare_run(load_run_config(TINY, resumed_overrides), tmp_path / "a", "run")
    run(reference)
    stopped = prepare_run(
        load_run_config(
            TINY,
            [
                *overrides,
                f"trainer.checkpoint_format={stopped_format}",
                "trainer.max_epochs=null",
                "trainer.max_updates=10",
            ],
        ),
        tmp_path / "b",
        "run",
    )
    run(stopped)  # latest (and its EMA) at update 9; the last files at update 10 are not used
    stopped_ext = EXTENSIONS[stopped_format]
    assert (
        stopped.path_provider.checkpoint_path / f"autoencoder.encoder_ema=0.9_cp=latest_model.{stopped_ext}"
    ).is_file()
    resumed = prepare_run(
        load_run_config(TINY, resumed_overrides), tmp_path / "b", "run", resume=True, resume_from="latest"
    )
    with caplog.at_level("INFO", logger="ksuit"):
        run(resumed)
    assert (
        "resumed the EMA of autoencoder.encoder (factor 0.9) from "
        f"autoencoder.encoder_ema=0.9_cp=latest_model.{stopped_ext}" in caplog.text
    )
    for leaf in ("encoder", "decoder"):
        name = f"autoencoder.{leaf}_ema=0.9_cp=last_model.{EXTENSIONS[resumed_format]}"
        a = load_file(reference.path_provider.checkpoint_path / name)["state_dict"]
        b = load_file(resumed.path_provider.checkpoint_path / name)["state_dict"]
        assert_bitwise_equal(a, b, name)


def test_ema_files_follow_the_checkpoint_format(tmp_path):
    prepared = prepare_run(
        load_run_config(
            TINY,
            [
                "trainer.checkpoint_format=safetensors",
                "trainer.max_epochs=null",
                "trainer.max_updates=4",
                "callbacks=[{kind: ema, target_factors: [0.9], model_names: [encoder], every_n_updates: 2}]",
            ],
        ),
        tmp_path,
        "run",
    )
    run(prepared)
    folder = prepared.path_provider.checkpoint_path
    ema_files = sorted(p.name for p in folder.glob("*_ema=*") if not p.name.endswith(".json"))
    assert ema_files == [
        "autoencoder.encoder_ema=0.9_cp=E0_U2_S16_model.safetensors",
        "autoencoder.encoder_ema=0.9_cp=E0_U4_S32_model.safetensors",
        "autoencoder.encoder_ema=0.9_cp=last_model.safetensors",
    ]
    saved = load_file(folder / ema_files[-1])
    assert saved["ema_factor"] == 0.9 and saved["checkpoint_tag"] == "last"
    assert saved["config_kind"] == "ksuit.zoo.autoencoder.EncoderConfig"


def test_model_paths_is_the_deprecated_name_of_model_names(tmp_path):
    with pytest.warns(DeprecationWarning, match="'model_paths' is deprecated; name the key 'model_names'"):
        assert EmaCallback([0.9], model_paths=["encoder"]).model_names == ["encoder"]
    with pytest.raises(ValueError, match="both model_names and model_paths"):
        EmaCallback([0.9], model_names=["encoder"], model_paths=["decoder"])
    # a config written for ksuit 0.1 still runs, with the warning
    config = load_run_config(
        TINY,
        [
            "trainer.max_epochs=null",
            "trainer.max_updates=2",
            "callbacks=[{kind: ema, target_factors: [0.9], model_paths: [encoder]}]",
        ],
    )
    with pytest.warns(DeprecationWarning, match="'model_names'"):
        prepared = prepare_run(config, tmp_path, "run")
    run(prepared)
    folder = prepared.path_provider.checkpoint_path
    assert (folder / "autoencoder.encoder_ema=0.9_cp=last_model.th").is_file()
    assert not list(folder.glob("autoencoder.decoder_ema=*"))


def test_ema_without_files_restarts_with_a_warning(tmp_path, caplog):
    overrides = ["callbacks=[{kind: checkpoint, every_n_epochs: 1}]"]
    run(prepare_run(load_run_config(TINY, [*overrides, "trainer.max_epochs=1"]), tmp_path, "run"))
    resumed = prepare_run(
        load_run_config(
            TINY, ["callbacks=[{kind: checkpoint, every_n_epochs: 1}, {kind: ema, target_factors: [0.9]}]"]
        ),
        tmp_path,
        "run",
        resume=True,
    )
    resumed.initializer.strict = False  # the stopped run had no EMA callback
    with caplog.at_level("WARNING", logger="ksuit"):
        run(resumed)
    assert "no EMA file of autoencoder.encoder (factor 0.9) to resume from" in caplog.text
