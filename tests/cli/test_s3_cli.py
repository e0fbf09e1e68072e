"""Every command on S3 URLs (moto over HTTP), `--storage-option KEY=VALUE` for all of them, and
clear errors for a store that cannot be used."""

from __future__ import annotations

import pytest
from tests.conftest import FakeTrainer, autoencoder_config, train_one_step
from typer.testing import CliRunner

from ksuit.cli import app, main
from ksuit.cli.storage_options import hoist_storage_options, parse_storage_options
from ksuit.providers import PathProvider
from ksuit.storage import set_storage_options
from ksuit.utils.training import TrainingIteration, UpdateCounter
from ksuit.writers import CheckpointWriter
from ksuit.zoo.autoencoder import Autoencoder

runner = CliRunner()


@pytest.fixture
def run(s3) -> str:
    model = Autoencoder(autoencoder_config()).initialize()
    train_one_step(model)
    counter = UpdateCounter(None, TrainingIteration(epoch=30), updates_per_epoch=20, effective_batch_size=4)
    counter.next_update()
    pp = PathProvider(f"{s3.url}/runs", "run")
    with CheckpointWriter(pp, counter) as writer:
        writer.save(
            model, "E0_U1_S0", trainer=FakeTrainer(counter), save_latest_weights=True, save_latest_optim=True
        )
    yield pp.run_output_path
    set_storage_options("", None)


def test_ls_inspect_verify_and_export_work_on_s3_urls(run):
    result = runner.invoke(app, ["ls", run])
    assert result.exit_code == 0, result.output
    assert "10 files" in result.output and "autoencoder.encoder" in result.output
    weights = f"{run}/checkpoints/autoencoder.encoder_cp=latest_model.th"
    result = runner.invoke(app, ["inspect", weights])
    assert result.exit_code == 0, result.output
    assert "state_dict.layers.0.weight" in result.output or "tensors" in result.output
    result = runner.invoke(app, ["verify", run])
    assert result.exit_code == 0, result.output
    assert "2 sets, 0 with problems" in result.output
    result = runner.invoke(app, ["export", weights, "--to", "safetensors"])
    assert result.exit_code == 0, result.output
    assert "autoencoder.encoder_cp=latest_model.safetensors" in result.output
    result = runner.invoke(app, ["ls", run])
    assert "11 files" in result.output
    result = runner.invoke(app, ["verify", run, "--repair", "--grace", "0"])
    assert result.exit_code == 0, result.output


def test_storage_options_reach_every_command(run, s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    args = [
        "--storage-option",
        f"endpoint_url={s3.endpoint.url}",
        "--storage-option",
        "ksuit_retry_seconds=5",
    ]
    result = runner.invoke(app, [*args, "ls", run])
    assert result.exit_code == 0, result.output
    assert "10 files" in result.output
    # after the command's name too (main() moves it before)
    monkeypatch.setattr(
        "sys.argv", ["ksuit", "verify", run, f"--storage-option=endpoint_url={s3.endpoint.url}"]
    )
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 0


def test_storage_option_values_are_json_or_text_and_dotted_keys_nest():
    options = parse_storage_options(["anon=false", "client_kwargs.region_name=eu-west-1", "key=abc=d"])
    assert options == {"anon": False, "client_kwargs": {"region_name": "eu-west-1"}, "key": "abc=d"}
    assert hoist_storage_options(["ls", "x", "--storage-option", "a=1", "--storage-option=b=2"]) == [
        "--storage-option",
        "a=1",
        "--storage-option=b=2",
        "ls",
        "x",
    ]


def test_a_bad_storage_option_is_a_usage_error(run):
    result = runner.invoke(app, ["--storage-option", "novalue", "ls", run])
    assert result.exit_code == 2
    assert "is not KEY=VALUE" in result.output


def test_a_missing_bucket_is_named_by_every_command(s3):
    for args in (
        ["ls", "s3://ksuit-missing-bucket/runs/run"],
        ["verify", "s3://ksuit-missing-bucket/runs/run"],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert (
            "the bucket 'ksuit-missing-bucket'" in result.output and "never creates buckets" in result.output
        )
