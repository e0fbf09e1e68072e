from pathlib import Path

import pytest
import torch

from ksuit.initializers import PreviousRunInitializer, transform_state_dict
from ksuit.schemas.run import load_run_config
from ksuit.storage import load_file
from ksuit.trainers.runner import prepare_run, run

TINY = Path(__file__).parents[1] / "e2e" / "tiny_autoencoder.yaml"


@pytest.fixture(scope="module")
def previous(tmp_path_factory):
    root = tmp_path_factory.mktemp("previous")
    run(prepare_run(load_run_config(TINY, ["trainer.max_epochs=2"]), root, "prev"))
    return root / "prev"


def test_transform_state_dict():
    sd = {"net.0.weight": 1, "net.0.bias": 2, "net.2.weight": 3, "head.w": 4}
    assert transform_state_dict(sd, ["head.*", "net.0.bias"], {r"^net\.": "body."}) == {
        "body.0.weight": 1,
        "body.2.weight": 3,
    }
    assert (
        transform_state_dict(sd, [], [{"pattern": "0", "replacement": "1"}, ("head", "tail")])["tail.w"] == 4
    )
    with pytest.raises(ValueError, match="made two keys"):
        transform_state_dict(sd, [], {r"\.\d\.": "."})
    with pytest.raises(ValueError, match="not a regular expression"):
        PreviousRunInitializer("x", patterns_to_rename={"(": ""})


def test_new_run_starts_from_the_previous_weights(previous, tmp_path):
    prepared = prepare_run(
        load_run_config(
            TINY,
            [
                "trainer.max_epochs=null",
                "trainer.max_updates=1",
                "callbacks=[]",
                f"initializers=[{{kind: previous_run, run_dir: {previous}, checkpoint: last, "
                "model_names: [encoder]}]",
            ],
        ),
        tmp_path,
        "new",
    )
    loaded = {}

    class Capture:
        def apply(self, trainer):
            loaded.update({k: v.clone() for k, v in trainer.model.encoder.state_dict().items()})

    prepared.initializer.initializers.append(Capture())
    run(prepared)
    expected = load_file(previous / "checkpoints" / "autoencoder.encoder_cp=last_model.th")["state_dict"]
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert str(prepared.trainer.update_counter.cur_iteration) == "E0_U1_S8"  # progress starts fresh


def test_keys_to_remove_strictness_and_renames(previous, tmp_path):
    prepared = prepare_run(load_run_config(TINY, ["callbacks=[]"]), tmp_path, "new")
    prepared.trainer.setup(prepared.model, prepared.datasets["train"])
    with pytest.raises(
        ValueError, match=r"do not fit autoencoder.encoder: missing \['net.2.weight', 'net.2.bias'\]"
    ):
        PreviousRunInitializer(previous, keys_to_remove=["net.2.*"]).apply(prepared.trainer)
    before = prepared.model.encoder.net[2].weight.clone()
    PreviousRunInitializer(previous, keys_to_remove=["net.2.*"], strict=False, model_names=["encoder"]).apply(
        prepared.trainer
    )
    assert torch.equal(prepared.model.encoder.net[2].weight, before)
    with pytest.raises(ValueError, match="unexpected"):
        PreviousRunInitializer(previous, patterns_to_rename={r"^net": "body"}).apply(prepared.trainer)
    init = PreviousRunInitializer(previous, checkpoint="epoch=2", model_names=["decoder"])
    init.apply(prepared.trainer)
    assert load_file(init.loaded["autoencoder.decoder"])["training_iteration"]["epoch"] == 2
    init = PreviousRunInitializer(previous, checkpoint="last", ema_factor=0.9)
    init.apply(prepared.trainer)
    assert init.loaded["autoencoder.encoder"].name == "autoencoder.encoder_ema=0.9_cp=last_model.th"


def test_missing_checkpoint_names_the_available_tags(previous, tmp_path):
    prepared = prepare_run(load_run_config(TINY, ["callbacks=[]"]), tmp_path, "new")
    prepared.trainer.setup(prepared.model, prepared.datasets["train"])
    with pytest.raises(
        FileNotFoundError,
        match=r"no weights of autoencoder.encoder match 'E9_U1_S1'.*its tags: E2_U16_S128, best",
    ):
        PreviousRunInitializer(previous, checkpoint="E9_U1_S1").apply(prepared.trainer)


def test_a_checkpoint_is_required(previous):
    # None would select nothing (it used to fail in apply() with a TypeError from deep inside)
    with pytest.raises(ValueError, match="needs the checkpoint to start from: a tag such as 'last'"):
        PreviousRunInitializer(previous, checkpoint=None)
