"""`ksuit ls`, `ksuit inspect`, `ksuit verify` through typer's CliRunner, plus one real
`python -m ksuit verify` process."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from tests.conftest import FakeTrainer, autoencoder_config, train_one_step
from typer.testing import CliRunner

from ksuit.cli import app
from ksuit.writers.checkpoint_writer import CheckpointWriter
from ksuit.zoo.autoencoder import Autoencoder

runner = CliRunner()


@pytest.fixture
def run(path_provider, update_counter):
    """Sets E0_U1_S0 and latest (weights, optimizers, trainer) and E0_U2_S0 weights as safetensors."""
    model = Autoencoder(autoencoder_config()).initialize()
    train_one_step(model)
    update_counter.next_update()
    trainer = FakeTrainer(update_counter)
    CheckpointWriter(path_provider, update_counter).save(
        model, "E0_U1_S0", trainer=trainer, save_latest_weights=True, save_latest_optim=True
    )
    update_counter.next_update()
    CheckpointWriter(path_provider, update_counter, format="safetensors").save(
        model, "E0_U2_S0", save_optim=False
    )
    return path_provider.run_output_path, path_provider.checkpoint_path


def rows(output: str) -> list[list[str]]:
    """The cells of every rich table row."""
    return [[c.strip() for c in line.strip("│ ").split("│")] for line in output.splitlines() if "│" in line]


def test_ls_lists_every_file_with_iteration_and_total(run):
    run_dir, folder = run
    result = runner.invoke(app, ["ls", str(run_dir)])
    assert result.exit_code == 0, result.output
    table = rows(result.output)
    files = sorted(p for p in folder.iterdir() if p.name.endswith((".th", ".safetensors")))
    assert len(table) == len(files) == 12
    assert ["autoencoder", "latest", "trainer", "E0_U1_S0", "torch"] == table[1][:5]
    assert ["autoencoder.encoder", "E0_U2_S0", "model", "E0_U2_S0", "safetensors"] in [r[:5] for r in table]
    # latest's iteration comes from its manifest, never from loading tensors
    assert all(r[3] == "E0_U1_S0" for r in table if r[1] == "latest")
    # E0_U1_S0's optimizer and trainer files are hard links of latest's: their bytes count once
    total = sum({p.stat().st_ino: p.stat().st_size for p in files}.values())
    assert total < sum(p.stat().st_size for p in files)
    assert "12 files, total" in result.output and f"({total} bytes; hard links counted once)" in result.output


def test_inspect_th_shows_metadata_and_tensors(run):
    _, folder = run
    result = runner.invoke(app, ["inspect", str(folder / "autoencoder.encoder_cp=E0_U1_S0_model.th")])
    assert result.exit_code == 0, result.output
    assert "training_iteration: {'epoch': 0, 'update': 1, 'sample': 0}" in result.output
    assert "config_kind: 'ksuit.zoo.autoencoder.EncoderConfig'" in result.output
    assert ["state_dict.net.0.weight", "(32, 16)", "float32", "2048"] in rows(result.output)
    assert "4 tensors" in result.output


def test_inspect_optimizer_and_safetensors(run):
    _, folder = run
    result = runner.invoke(app, ["inspect", str(folder / "autoencoder.decoder_cp=latest_optim.th")])
    assert result.exit_code == 0, result.output
    assert ["state.0.exp_avg", "(32, 4)", "float32", "512"] in rows(result.output)
    assert "param_groups" in result.output
    result = runner.invoke(
        app, ["inspect", str(folder / "autoencoder.encoder_cp=E0_U2_S0_model.safetensors")]
    )
    assert result.exit_code == 0, result.output
    assert ["state_dict.net.0.weight", "(32, 16)", "F32", "2048"] in rows(result.output)
    assert "update': 2" in result.output


def test_verify_clean_run_exits_0(run):
    run_dir, _ = run
    result = runner.invoke(app, ["verify", str(run_dir)])
    assert result.exit_code == 0, result.output
    table = rows(result.output)
    assert {(r[1], r[5]) for r in table} == {("E0_U1_S0", "OK"), ("latest", "OK"), ("E0_U2_S0", "OK")}
    assert "3 sets, 0 with problems" in result.output


def test_verify_reports_an_altered_byte_and_a_missing_file(run):
    run_dir, folder = run
    victim = folder / "autoencoder.decoder_cp=latest_model.th"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    victim.write_bytes(bytes(data))
    (folder / "autoencoder.encoder_cp=E0_U1_S0_optim.th").unlink()
    result = runner.invoke(app, ["verify", str(run_dir)])
    assert result.exit_code == 1, result.output
    assert re.search(
        r"autoencoder@latest: autoencoder.decoder_cp=latest_model.th: checksum \w+ != \w+", result.output
    )
    assert "autoencoder@E0_U1_S0: autoencoder.encoder_cp=E0_U1_S0_optim.th: missing" in result.output
    assert "3 sets, 2 with problems" in result.output


def test_verify_reports_a_truncated_file_even_with_a_matching_manifest(run):
    """A file cut short and its manifest rewritten to match: only loading it shows the damage."""
    from ksuit.storage.local.safe_files import hash_regular_file as hash_file
    from ksuit.storage.manifest import read_manifest

    run_dir, folder = run
    victim = folder / "autoencoder_cp=E0_U1_S0_trainer.th"
    victim.write_bytes(victim.read_bytes()[:100])
    manifest_path = folder / "autoencoder_cp=E0_U1_S0.manifest.json"
    manifest = read_manifest(manifest_path)
    manifest.files[victim.name].size, manifest.files[victim.name].checksum = hash_file(victim)
    manifest_path.write_text(manifest.to_json())
    result = runner.invoke(app, ["verify", str(run_dir)])
    assert result.exit_code == 1, result.output
    assert f"{victim.name}: cannot read" in result.output and "truncated or corrupt" in result.output


def test_verify_completes_an_interrupted_save_first(run):
    """A committed journal whose renames were not applied yet: verify rolls it forward."""
    import json

    from ksuit.layout import journal_filename, temp_filename

    run_dir, folder = run
    final = folder / "autoencoder_cp=latest_trainer.th"
    tmp = folder / temp_filename(final.name, "abcd1234")
    final.rename(tmp)  # as if the kill came right after the journal landed
    (folder / journal_filename(1)).write_text(json.dumps({"renames": [[tmp.name, final.name]]}))
    (folder / temp_filename("stray_cp=latest_model.th", "ffff0000")).write_bytes(b"partial")
    result = runner.invoke(app, ["verify", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "completed 1 interrupted renames, removed 1 temporary files" in result.output
    assert final.exists() and not tmp.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ls", "{tmp}/nope"], "run folder .*nope does not exist"),
        (["verify", "{tmp}/nope"], "run folder .*nope does not exist"),
        (["verify", "{tmp}/out/run1/checkpoints/autoencoder_cp=latest_trainer.th"], "is a file"),
        (["inspect", "{tmp}/nope.th"], "nope.th is not a file"),
        (["verify", "{tmp}"], "has no checkpoints folder"),
    ],
)
def test_usage_errors_exit_2_with_one_line(run, tmp_path, args, message):
    result = runner.invoke(app, [a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert re.search(message, lines[0]), lines[0]


def test_inspect_corrupt_file_exits_1_naming_it(run):
    _, folder = run
    victim = folder / "autoencoder.encoder_cp=latest_model.th"
    victim.write_bytes(victim.read_bytes()[:200])
    result = runner.invoke(app, ["inspect", str(victim)])
    assert result.exit_code == 1, result.output
    assert victim.name in result.output and "truncated or corrupt" in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_python_m_ksuit_verify_real_process(run):
    run_dir, folder = run
    proc = subprocess.run(
        [sys.executable, "-m", "ksuit", "verify", str(run_dir)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 sets, 0 with problems" in proc.stdout
    (folder / "autoencoder.encoder_cp=latest_model.th").unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "ksuit", "verify", str(run_dir)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1
    assert "autoencoder.encoder_cp=latest_model.th: missing" in proc.stdout
