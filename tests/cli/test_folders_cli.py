"""`ksuit verify` and `ksuit ls` of checkpoint folders marked complete by a folder manifest (a
Hugging Face output folder): every numbered folder, complete or not."""

import os

import pytest
from typer.testing import CliRunner

from ksuit.cli import app
from ksuit.readers import checkpoint_folders
from ksuit.storage import write_folder_manifest


@pytest.fixture
def output_dir(tmp_path):
    """checkpoint-2 and -4 marked complete, checkpoint-6 cut short before it was marked; plus the
    other things a Hugging Face output folder holds."""
    for step in (2, 4, 6):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(os.urandom(1000))
        (folder / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
        if step != 6:
            write_folder_manifest(folder, {"update": step})
    (tmp_path / "runs").mkdir()  # e.g. tensorboard logs: not a checkpoint folder
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def test_verify_reports_every_checkpoint_folder_and_fails_on_an_incomplete_one(output_dir):
    result = run("verify", str(output_dir))
    assert result.exit_code == 1, result.output
    assert "checkpoint-2" in result.output and "checkpoint-4" in result.output
    assert "checkpoint-6: ksuit.manifest.json: missing: the folder was never marked complete" in result.output
    assert "3 checkpoint folders, 1 incomplete (checksums verified)" in result.output
    assert "runs" not in result.output.split("checkpoint folders")[0].split("\n", 1)[1]


def test_verify_passes_when_every_folder_is_complete_and_catches_a_changed_byte(output_dir):
    write_folder_manifest(output_dir / "checkpoint-6", {"update": 6})
    result = run("verify", str(output_dir))
    assert result.exit_code == 0, result.output
    assert "3 checkpoint folders, 0 incomplete" in result.output
    path = output_dir / "checkpoint-4" / "model.safetensors"
    path.write_bytes(os.urandom(1000))  # same size: only the checksum tells
    assert run("ls", str(output_dir)).exit_code == 0
    result = run("verify", str(output_dir))
    assert result.exit_code == 1
    assert "checkpoint-4: model.safetensors: checksum" in result.output


def test_ls_lists_folders_with_step_files_size_and_status(output_dir):
    result = run("ls", str(output_dir))
    assert result.exit_code == 1
    rows = [line for line in result.output.splitlines() if line.startswith("│ checkpoint-")]
    assert len(rows) == 3
    assert "U4" in rows[1] and "complete" in rows[1] and "INCOMPLETE" in rows[2]


def test_one_checkpoint_folder_alone(output_dir):
    result = run("verify", str(output_dir / "checkpoint-4"))
    assert result.exit_code == 0, result.output
    assert "1 checkpoint folders, 0 incomplete" in result.output
    (folders,) = [checkpoint_folders(output_dir / "checkpoint-4")]
    assert [f.name for f in folders] == ["checkpoint-4"] and folders[0].training_iteration.update == 4


def test_a_folder_without_any_manifest_is_not_taken_for_checkpoint_folders(tmp_path):
    (tmp_path / "checkpoint-1").mkdir()
    assert checkpoint_folders(tmp_path) is None
    result = run("verify", str(tmp_path))
    assert result.exit_code == 2 and "no checkpoints folder" in result.output
