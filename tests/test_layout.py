import pytest

from ksuit.layout import (
    CheckpointName,
    checkpoint_filename,
    format_info,
    is_temp_filename,
    manifest_filename,
    parse_checkpoint_filename,
    parse_manifest_filename,
    temp_filename,
    validate_name,
    validate_tag,
)
from ksuit.utils.training import TrainingIteration


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        (
            "autoencoder.encoder_cp=E10_U200_S800_model.th",
            CheckpointName("autoencoder.encoder", "E10_U200_S800", "model"),
        ),
        ("autoencoder.decoder_cp=last_optim.th", CheckpointName("autoencoder.decoder", "last", "optim")),
        ("my_model_cp=latest_trainer.th", CheckpointName("my_model", "latest", "trainer")),
        ("ae_ema=0.999_cp=E1_U2_S3_model.th", CheckpointName("ae", "E1_U2_S3", "model", "ema=0.999")),
        ("ae_cp=best_model.loss.val_model.th", CheckpointName("ae", "best_model.loss.val", "model")),
        ("ae_cp=latest_model.safetensors", CheckpointName("ae", "latest", "model", ext="safetensors")),
    ],
)
def test_parse_and_format_are_inverse(filename, expected):
    parsed = parse_checkpoint_filename(filename)
    assert parsed == expected
    assert parsed.filename == filename


@pytest.mark.parametrize(
    "filename",
    [
        "ae_cp=latest.manifest.json",
        ".ae_cp=latest_model.th.ab12.tmp",
        "ae_model.th",
        "notes.txt",
        "ae_cp=x_weights.th",
    ],
)
def test_non_checkpoints_do_not_parse(filename):
    assert parse_checkpoint_filename(filename) is None


def test_checkpoint_filename_builds_contract_names():
    assert checkpoint_filename("autoencoder.encoder", "E10_U200_S800", "model") == (
        "autoencoder.encoder_cp=E10_U200_S800_model.th"
    )
    assert checkpoint_filename("ae", "latest", "model", info=format_info({"ema": 0.999})) == (
        "ae_ema=0.999_cp=latest_model.th"
    )
    assert checkpoint_filename("ae", "last", "model", fmt="safetensors") == "ae_cp=last_model.safetensors"
    with pytest.raises(ValueError, match="role"):
        checkpoint_filename("ae", "last", "weights")


def test_progress_tags_carry_iterations():
    assert parse_checkpoint_filename("a_cp=E1_U2_S3_model.th").training_iteration == TrainingIteration(
        1, 2, 3
    )
    assert parse_checkpoint_filename("a_cp=latest_model.th").training_iteration is None


def test_manifest_and_temp_names_never_end_in_th():
    name = manifest_filename("autoencoder", "latest")
    assert not name.endswith(".th")
    assert parse_manifest_filename(name) == ("autoencoder", "latest")
    assert parse_manifest_filename(manifest_filename("ae_ema=0.9", "E1_U1_S1")) == ("ae_ema=0.9", "E1_U1_S1")
    tmp = temp_filename("ae_cp=latest_model.th", "abcd0123")
    assert is_temp_filename(tmp) and not tmp.endswith(".th")


@pytest.mark.parametrize("bad", ["", "a/b", "a\\b", "a\0b", "..", "x..y", ".hidden", "enc_cp=x"])
def test_validate_name_rejects(bad):
    with pytest.raises(ValueError):
        validate_name(bad)


@pytest.mark.parametrize("bad", ["", "a/b", "../up", "a\0", ".x"])
def test_validate_tag_rejects(bad):
    with pytest.raises(ValueError, match="checkpoint tag"):
        validate_tag(bad)


def test_validate_rejects_non_strings():
    with pytest.raises(TypeError, match="must be a str"):
        validate_tag(10)


def test_format_info_rejects_separators():
    with pytest.raises(ValueError):
        format_info({"ema": "0_9"})
