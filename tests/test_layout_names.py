"""Names, tags and info the file-name grammar cannot read back, or that carry control
characters, are refused before anything is written; what is accepted always round-trips."""

from __future__ import annotations

import random

import pytest
import torch
from pydantic import ValidationError

from ksuit.layout import (
    CheckpointName,
    checkpoint_filename,
    format_info,
    manifest_filename,
    parse_checkpoint_filename,
    parse_manifest_filename,
    validate_name,
    validate_output_name,
    validate_tag,
)
from ksuit.providers import PathProvider
from ksuit.writers import CheckpointWriter
from ksuit.zoo.autoencoder import EncoderConfig
from tests.conftest import written_files

CONTROL = ["\n", "\r", "\t", "\x1b[31m", "\x07", "\x7f", "\x9b", "\u202e", "\u2028", "\0", "\udcff"]


@pytest.mark.parametrize("name", ["enc_v=2", "enc_v=", "a_b-c.d=x.y", "x__k=v", "a_k=1_j=2"])
def test_a_model_name_read_back_as_name_plus_info_is_refused(name):
    with pytest.raises(ValueError, match="would be read back as"):
        validate_name(name)
    with pytest.raises(ValidationError, match="would be read back as"):
        EncoderConfig(name=name)
    with pytest.raises(ValueError, match="would be read back as"):
        checkpoint_filename(name, "latest", "trainer")


@pytest.mark.parametrize("name", ["enc=2", "enc_v2", "enc_=2", "enc_v=2_x", "_k=v", "a.b_c-d", "k=v"])
def test_names_with_equals_that_read_back_whole_are_accepted(name):
    filename = checkpoint_filename(name, "latest", "model")
    assert parse_checkpoint_filename(filename) == CheckpointName(name, "latest", "model")


def test_run_and_stage_names_are_folders_and_may_hold_key_value_parts(tmp_path):
    provider = PathProvider(tmp_path, "sweep_lr=0.1", stage_name="stage_bs=32")
    assert provider.run_output_path == tmp_path / "sweep_lr=0.1" / "stage_bs=32"
    with pytest.raises(ValueError, match="control"):
        PathProvider(tmp_path, "run\n1")


def test_a_tag_holding_the_name_tag_separator_is_refused():
    with pytest.raises(ValueError, match="contains '_cp='"):
        validate_tag("a_k=v_cp=b")
    # that tag would come back as info 'cp=a_k=v' and tag 'b'
    with pytest.raises(ValueError):
        checkpoint_filename("n", "a_k=v_cp=b", "model")


@pytest.mark.parametrize("char", CONTROL)
def test_control_characters_are_refused_in_names_tags_info_and_output_names(char):
    with pytest.raises(ValueError, match="control"):
        validate_name(f"enc{char}oder")
    with pytest.raises(ValueError, match="control"):
        validate_name(f"enc{char}", what="run_id", in_file_names=False)
    with pytest.raises(ValueError, match="control"):
        validate_tag(f"E1{char}")
    with pytest.raises(ValueError, match="control"):
        validate_output_name(f"x{char}_cp=latest_model.th")
    with pytest.raises(ValueError, match="control"):
        format_info({"ema": f"0.9{char}"})


def test_a_trailing_newline_is_no_part_of_a_valid_name():
    with pytest.raises(ValueError, match="control"):
        validate_output_name("x_cp=latest_model.th\n")
    with pytest.raises(ValueError, match="info key"):
        format_info({"ema\n": 0.9})
    assert parse_checkpoint_filename("x_cp=latest_model.th\n") is None
    assert parse_manifest_filename("x_cp=latest.manifest.json\n") is None


def test_save_model_checkpoint_refuses_an_output_name_with_a_trailing_newline(path_provider, update_counter):
    writer = CheckpointWriter(path_provider, update_counter)
    with pytest.raises(ValueError, match="control"):
        writer.save_model_checkpoint("enc_cp=latest_model.th\n", {"w": torch.zeros(1)}, "latest")
    assert written_files(path_provider) == []


# ---- every accepted combination round-trips (a seeded random search; hypothesis is not installed)

PIECES = [
    "a",
    "b",
    "E1",
    "_",
    "=",
    "-",
    ".",
    "cp",
    "_cp",
    "cp=",
    "_cp=",
    "k=v",
    "_k=v",
    "model",
    "_model",
    ".th",
]
PIECES += ["latest", "ema", "0.9", "U2", "S3", "safetensors", ".manifest.json", "x=", "=y", "__", "é"]


def _random_text(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 5)))


def _accepted(fn, *args):
    try:
        return fn(*args)
    except (ValueError, TypeError):
        return None


def test_every_accepted_name_tag_and_info_round_trips():
    rng = random.Random(20240812)
    accepted = refused = 0
    for _ in range(30_000):
        name, tag = _random_text(rng), _random_text(rng)
        info = {_random_text(rng): _random_text(rng) for _ in range(rng.randint(0, 2))}
        kind, fmt = rng.choice(["model", "optim", "trainer"]), rng.choice(["torch", "safetensors"])
        info_text = _accepted(format_info, info)
        if (
            info_text is None
            or _accepted(validate_name, name) is None
            or _accepted(validate_tag, tag) is None
        ):
            refused += 1
            continue
        filename = checkpoint_filename(name, tag, kind, info_text, fmt)  # must not raise for valid parts
        parsed = parse_checkpoint_filename(filename)
        assert parsed is not None and (parsed.name, parsed.tag, parsed.role, parsed.info) == (
            name,
            tag,
            kind,
            info_text,
        ), filename
        assert parsed.filename == filename
        group = parsed.group
        assert parse_manifest_filename(manifest_filename(group, tag)) == (group, tag)
        accepted += 1
    # the search explored both sides of the rules
    assert accepted > 3_000 and refused > 3_000, (accepted, refused)
