"""`ksuit train` in-process: argument handling and error reporting (no subprocess)."""

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from ksuit.cli import app
from ksuit.cli.train import _split_resume_tag, resume_command

TINY = Path(__file__).parent / "tiny_autoencoder.yaml"
runner = CliRunner()


def test_help_documents_resume():
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0
    assert "--resume" in result.output and "newest usable" in result.output


@pytest.mark.parametrize(
    ("tokens", "resume", "resume_from", "expected"),
    [
        (["a.b=1"], False, None, (["a.b=1"], None)),
        (["a.b=1"], True, None, (["a.b=1"], None)),
        (["E10", "a.b=1"], True, None, (["a.b=1"], "E10")),
        (["epoch=10"], True, None, ([], "epoch=10")),
        ([], True, "last", ([], "last")),
    ],
)
def test_resume_tag_comes_from_the_positional_arguments(tokens, resume, resume_from, expected):
    assert _split_resume_tag(tokens, resume, resume_from) == expected


def test_resume_tag_errors():
    with pytest.raises(typer.BadParameter, match="one checkpoint"):
        _split_resume_tag(["E1", "E2"], True, None)
    with pytest.raises(typer.BadParameter, match="a checkpoint tag needs --resume"):
        _split_resume_tag(["latest"], False, None)


def test_resume_command(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert (
        resume_command(Path("c.yaml"), ["a=1"], Path("runs"), "x")
        == "ksuit train c.yaml a=1 --output runs --run-id x --resume"
    )
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resume_command(Path("c.yaml"), [], Path("runs"), "x").startswith(
        "torchrun --nproc_per_node=2 -m ksuit train c.yaml"
    )


def test_config_errors_exit_2_naming_key_and_file(tmp_path):
    result = runner.invoke(app, ["train", str(TINY), "trainer.max_epoch=2", "--output", str(tmp_path)])
    assert result.exit_code == 2
    assert "tiny_autoencoder.yaml: trainer.max_epoch: unknown key 'max_epoch'" in result.output


def test_resume_of_a_missing_run_exits_2(tmp_path):
    result = runner.invoke(
        app, ["train", str(TINY), "--output", str(tmp_path), "--run-id", "none", "--resume"]
    )
    assert result.exit_code == 2 and "has no checkpoints" in result.output


def test_train_and_resume_in_process(tmp_path):
    args = [
        "train",
        str(TINY),
        "trainer.max_epochs=1",
        "--output",
        str(tmp_path),
        "--run-id",
        "r",
        "--no-progress",
    ]
    assert runner.invoke(app, args).exit_code == 0
    assert (tmp_path / "r" / "checkpoints" / "autoencoder_cp=last_trainer.th").exists()
    result = runner.invoke(app, [*args[:3], "trainer.max_epochs=2", *args[3:], "--resume", "last"])
    assert result.exit_code == 0, result.output
    assert "resuming from checkpoint 'last' (E1_U8_S64)" in result.output
