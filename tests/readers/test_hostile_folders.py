"""Hostile run folders: damaged manifests, special files and symbolic links.

A damaged manifest is a damaged set: reported with the manifest's name, skipped by resume while
complete sets exist, and `ls`/`verify` exit 1 without a traceback. Only regular files inside
the folder are ever opened: a FIFO never blocks a reader or the next save, and nothing a link
points to (outside the folder or in) is stat'ed, hashed or printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from ksuit.cli import app
from ksuit.readers import list_checkpoints, scan_sets, select_resume_set
from ksuit.storage import CorruptCheckpointError
from ksuit.storage.manifest import Manifest, ManifestEntry, read_manifest
from ksuit.writers.checkpoint_writer import CheckpointWriter
from ksuit.zoo.autoencoder import Autoencoder
from tests import hostile as h
from tests.conftest import FakeTrainer, autoencoder_config, train_one_step

LATEST = "autoencoder_cp=latest.manifest.json"
TRAINER = "autoencoder_cp=latest_trainer.th"
EMPTY_XXH3 = "2d06800538d394c2"  # xxh3-64 of no bytes
runner = CliRunner()


@pytest.fixture
def run(path_provider, update_counter):
    """Two saves (U1, U2), each with latest: latest and E0_U2_S0 hold the same iteration."""
    model = Autoencoder(autoencoder_config()).initialize()
    writer = CheckpointWriter(path_provider, update_counter)
    trainer = FakeTrainer(update_counter)

    def save():
        train_one_step(model)
        update_counter.next_update()
        writer.save(
            model,
            str(update_counter.cur_iteration),
            trainer=trainer,
            save_latest_weights=True,
            save_latest_optim=True,
        )

    save()
    save()
    folder = path_provider.checkpoint_path
    return SimpleNamespace(run_dir=path_provider.run_output_path, folder=folder, save=save)


def edit_json(change):
    def damage(raw: bytes) -> bytes:
        data = json.loads(raw)
        data = change(data) or data
        return json.dumps(data).encode()

    return damage


def edit_entry(**fields):
    def change(data):
        data["files"][TRAINER].update(fields)

    return edit_json(change)


def rename_entry(name, **fields):
    def change(data):
        entry = data["files"].pop(TRAINER)
        data["files"][name] = {**entry, **fields}

    return edit_json(change)


DAMAGES = [
    ("non-UTF-8 byte", lambda raw: raw.replace(b'"run1"', b'"run\xff"')),
    ("not JSON", lambda raw: b"{not json"),
    ("empty file", lambda raw: b""),
    ("deeply nested", lambda raw: b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ("top level a list", edit_json(lambda d: [d])),
    ("files a list", edit_json(lambda d: d.update(files=[1]))),
    ("entry a list", edit_json(lambda d: d["files"].update({TRAINER: [1]}))),
    ("entry null", edit_json(lambda d: d["files"].update({TRAINER: None}))),
    ("size a string", edit_entry(size="6489")),
    ("size a float", edit_entry(size=6489.0)),
    ("size a bool", edit_entry(size=True)),
    ("size negative", edit_entry(size=-1)),
    ("checksum an int", edit_entry(checksum=5)),
    ("checksum not hex", edit_entry(checksum="../../etc")),
    ("kind unknown", edit_entry(kind="weights")),
    ("iteration value a string", edit_entry(training_iteration={"epoch": "0"})),
    ("iteration key unknown", edit_entry(training_iteration={"bogus": 1})),
    ("iteration a list", edit_entry(training_iteration=[1])),
    ("set iteration negative", edit_json(lambda d: d.update(training_iteration={"update": -1}))),
    ("group a number", edit_json(lambda d: d.update(group=5))),
    ("tag null", edit_json(lambda d: d.update(tag=None))),
    ("version a string", edit_json(lambda d: d.update(version="1"))),
    ("version 0", edit_json(lambda d: d.update(version=0))),
    ("checksum algorithm unknown", edit_json(lambda d: d.update(checksum_algorithm="md5"))),
    ("entry /dev/zero", rename_entry("/dev/zero", size=0, checksum=EMPTY_XXH3)),
    ("entry ../", rename_entry("../autoencoder_cp=latest_trainer.th")),
    ("entry absolute", rename_entry("/tmp/autoencoder_cp=latest_trainer.th")),
    ("entry in a subfolder", rename_entry("sub/autoencoder_cp=latest_trainer.th")),
    ("entry hidden", rename_entry(".autoencoder_cp=latest_trainer.th")),
    ("entry not a checkpoint name", rename_entry("notes.txt")),
]


def damage(run, change) -> Path:
    path = run.folder / LATEST
    path.write_bytes(change(path.read_bytes()))
    return path


@pytest.mark.parametrize("change", [pytest.param(d[1], id=d[0]) for d in DAMAGES])
def test_a_damaged_manifest_is_a_damaged_set_that_resume_skips(run, change):
    path = damage(run, change)
    with pytest.raises(CorruptCheckpointError, match="not a valid ksuit manifest") as info:
        read_manifest(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    chosen, skipped = select_resume_set(run.run_dir, "autoencoder")
    assert chosen.tag == "E0_U2_S0"
    reasons = dict(skipped)
    assert LATEST in reasons["latest"] and "not a valid ksuit manifest" in reasons["latest"]


def test_an_oversized_manifest_is_not_read(run, monkeypatch):
    from ksuit.storage import manifest

    cap = max(p.stat().st_size for p in run.folder.glob("*.manifest.json"))
    monkeypatch.setattr(manifest, "MAX_MANIFEST_BYTES", cap)
    damage(run, lambda raw: raw + b" " * cap)  # still valid JSON, but too big to read
    chosen, skipped = select_resume_set(run.run_dir, "autoencoder")
    assert chosen.tag == "E0_U2_S0"
    assert f"more than the {cap} bytes a manifest may have" in dict(skipped)["latest"]


def test_a_newer_manifest_version_says_upgrade(run):
    damage(run, edit_json(lambda d: d.update(version=2)))
    chosen, skipped = select_resume_set(run.run_dir, "autoencoder")
    assert chosen.tag == "E0_U2_S0" and "upgrade ksuit" in dict(skipped)["latest"]


@pytest.mark.parametrize(
    "change",
    [pytest.param(DAMAGES[i][1], id=DAMAGES[i][0]) for i in (0, 3, 7, 8, 17, 21, 25)],
)
def test_ls_and_verify_report_a_damaged_manifest_and_exit_1(run, change):
    damage(run, change)
    for command in ("ls", "verify"):
        result = runner.invoke(app, [command, str(run.run_dir)])
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output
        assert LATEST in result.output and "not a valid ksuit manifest" in result.output
    assert "E0_U1_S0" in result.output and "E0_U2_S0" in result.output  # the other sets are listed


def test_manifests_written_by_ksuit_0_1_still_read():
    text = """{"checksum_algorithm": "xxh3_64", "files": {"m_cp=latest_model.th": {"checksum":
    "1a66e9854a2f9e77", "kind": "model", "size": 5261, "training_iteration": {"epoch": 0, "sample": 0,
    "update": 1}}, "m_cp=latest_trainer.th": {"checksum": "c8b543fcc243379d", "size": 6489}},
    "group": "m", "run_id": "run1", "tag": "latest", "training_iteration": {"epoch": 0, "sample": 0,
    "update": 1}, "version": 1, "written_by": "a newer ksuit"}"""
    manifest = Manifest.from_json(text)
    iteration = {"epoch": 0, "sample": 0, "update": 1}
    assert manifest == Manifest(
        group="m",
        tag="latest",
        files={
            "m_cp=latest_model.th": ManifestEntry(5261, "1a66e9854a2f9e77", "model", iteration),
            "m_cp=latest_trainer.th": ManifestEntry(6489, "c8b543fcc243379d"),
        },
        training_iteration=iteration,
        run_id="run1",
    )
    assert Manifest.from_json(manifest.to_json()) == manifest


# --- special files and links ----------------------------------------------------------------


def test_a_fifo_manifest_blocks_neither_readers_nor_the_next_save(run):
    path = run.folder / LATEST
    path.unlink()
    os.mkfifo(path)
    fifos = (path,)
    infos = h.call_with_deadline(lambda: list_checkpoints(run.run_dir), fifos)
    assert len(infos) == 15  # 3 tags x (2 models, 2 optimizers, trainer)
    sets = h.call_with_deadline(lambda: scan_sets(run.run_dir, checksum=True), fifos)
    (latest,) = [s for s in sets if (s.group, s.tag) == ("autoencoder", "latest")]
    assert "is a FIFO" in latest.problems["(manifest)"]
    chosen, skipped = h.call_with_deadline(lambda: select_resume_set(run.run_dir, "autoencoder"), fifos)
    assert chosen.tag == "E0_U2_S0" and "is a FIFO" in dict(skipped)["latest"]
    result = h.call_with_deadline(lambda: runner.invoke(app, ["ls", str(run.run_dir)]), fifos)
    assert result.exit_code == 1 and f"problem: {LATEST}: " in result.output and "FIFO" in result.output
    h.call_with_deadline(run.save, fifos)  # the next save replaces the FIFO with a manifest
    assert path.is_file()
    assert runner.invoke(app, ["verify", str(run.run_dir)]).exit_code == 0


@pytest.fixture
def outside(tmp_path):
    folder = tmp_path / "outside"
    folder.mkdir()
    return folder


def test_a_link_out_of_the_folder_is_reported_never_followed(run, outside):
    """latest's trainer file becomes a link to an exact copy outside: it would verify as OK if
    followed; it is a problem instead, and nothing about the target is printed."""
    victim = run.folder / TRAINER
    secret = outside / "secret.th"
    secret.write_bytes(victim.read_bytes())
    victim.unlink()
    victim.symlink_to(secret)
    assert TRAINER not in {i.path.name for i in list_checkpoints(run.run_dir)}
    chosen, skipped = select_resume_set(run.run_dir, "autoencoder")
    assert chosen.tag == "E0_U2_S0" and "is a symbolic link" in dict(skipped)["latest"]
    for command in ("ls", "verify"):
        result = runner.invoke(app, [command, str(run.run_dir)])
        assert result.exit_code == 1, result.output
        assert f"{TRAINER}: is a symbolic link" in result.output
        assert "outside" not in result.output and "Traceback" not in result.output


def test_a_link_inside_the_folder_is_reported_too(run):
    victim = run.folder / TRAINER
    victim.unlink()
    victim.symlink_to(run.folder / "autoencoder_cp=E0_U2_S0_trainer.th")
    chosen, skipped = select_resume_set(run.run_dir, "autoencoder")
    assert chosen.tag == "E0_U2_S0" and "is a symbolic link" in dict(skipped)["latest"]


def test_links_to_fifos_and_dangling_links_never_block(run, outside):
    fifo = outside / "fifo"
    os.mkfifo(fifo)
    (run.folder / TRAINER).unlink()
    (run.folder / TRAINER).symlink_to(fifo)
    dangling = run.folder / "autoencoder.encoder_cp=E0_U2_S0_model.th"
    dangling.unlink()
    dangling.symlink_to(outside / "gone")
    fifo_inside = run.folder / "autoencoder.decoder_cp=E0_U1_S0_model.th"
    fifo_inside.unlink()
    os.mkfifo(fifo_inside)
    fifos = (fifo, fifo_inside)
    with pytest.raises(FileNotFoundError, match="no usable checkpoint set"):
        h.call_with_deadline(lambda: select_resume_set(run.run_dir, "autoencoder"), fifos)
    result = h.call_with_deadline(lambda: runner.invoke(app, ["verify", str(run.run_dir)]), fifos)
    assert result.exit_code == 1, result.output
    assert f"{TRAINER}: is a symbolic link" in result.output
    assert f"{dangling.name}: is a symbolic link" in result.output
    assert f"{fifo_inside.name}: is a FIFO" in result.output
    assert "outside" not in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_real_processes_never_hang_on_dev_zero_or_a_fifo_manifest(run):
    """`python -m ksuit verify` with a manifest entry naming /dev/zero, then `ls` and `verify`
    with a manifest that is a FIFO: each ends (timeout = the test's deadline) with exit 1."""
    damage(run, rename_entry("/dev/zero", size=0, checksum=EMPTY_XXH3))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    def ksuit(*args):
        return subprocess.run(
            [sys.executable, "-m", "ksuit", *args], capture_output=True, text=True, timeout=120, env=env
        )

    proc = ksuit("verify", str(run.run_dir))
    assert proc.returncode == 1 and "/dev/zero" in proc.stdout and "Traceback" not in proc.stderr
    (run.folder / LATEST).unlink()
    os.mkfifo(run.folder / LATEST)
    for command in ("ls", "verify"):
        proc = ksuit(command, str(run.run_dir))
        assert proc.returncode == 1 and "FIFO" in proc.stdout, proc.stdout + proc.stderr
