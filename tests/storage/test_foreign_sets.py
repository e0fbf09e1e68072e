"""Another framework's checkpoint file (Lightning's `.ckpt`) as a ksuit set of one file: written
atomically with its manifest, listed, verified, and cleaned up after a crash like ksuit's own."""

import json

import pytest
import torch
from typer.testing import CliRunner

import ksuit
from ksuit.cli import app
from ksuit.readers import scan_sets
from ksuit.storage import PendingFile, SetWriter, recover_folder
from ksuit.storage.errors import CorruptCheckpointError
from ksuit.storage.manifest import read_manifest


def write_ckpt(folder, name: str, value: float) -> None:
    payload = {"state_dict": {"w": torch.full((4,), value)}, "epoch": 1, "global_step": 8}
    SetWriter(folder).write([PendingFile(name, payload, "torch", None, "lightning", name, {"update": 8})])


def test_a_ckpt_file_is_a_set_of_its_own_and_verifies(tmp_path):
    write_ckpt(tmp_path, "last.ckpt", 1.0)
    write_ckpt(tmp_path, "last.ckpt", 2.0)  # replaced as a whole, with its manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "lightning_cp=last.ckpt.manifest.json"]
    assert torch.equal(
        torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]["w"], torch.full((4,), 2.0)
    )
    (s,) = scan_sets(tmp_path, checksum=True)
    assert (s.group, s.tag, s.ok, list(s.manifest.files)) == ("lightning", "last.ckpt", True, ["last.ckpt"])
    (info,) = ksuit.list_checkpoints(tmp_path)
    assert (info.model_name, info.tag, info.role, info.name) == (
        "lightning",
        "last.ckpt",
        "checkpoint",
        "last.ckpt",
    )
    assert str(info.training_iteration) == "U8"
    result = CliRunner().invoke(app, ["verify", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "1 sets, 0 with problems" in result.output


def test_a_changed_ckpt_fails_verify(tmp_path):
    write_ckpt(tmp_path, "epoch=1-step=8.ckpt", 1.0)
    data = bytearray((tmp_path / "epoch=1-step=8.ckpt").read_bytes())
    data[-30] ^= 0xFF
    (tmp_path / "epoch=1-step=8.ckpt").write_bytes(bytes(data))
    result = CliRunner().invoke(app, ["verify", str(tmp_path)])
    assert result.exit_code == 1
    assert "epoch=1-step=8.ckpt: checksum" in result.output


def test_recovery_removes_the_temporary_file_of_a_ckpt_save_cut_short(tmp_path):
    write_ckpt(tmp_path, "last.ckpt", 1.0)
    leftover = tmp_path / ".last.ckpt.0123abcd.tmp"  # a crash before the journal landed
    leftover.write_bytes(b"half a checkpoint")
    report = recover_folder(tmp_path)
    assert report.removed_temps == [leftover.name] and not leftover.exists()
    (tmp_path / ".notes.txt.0123abcd.tmp").write_bytes(b"not ours")  # another program's file stays
    recover_folder(tmp_path)
    assert (tmp_path / ".notes.txt.0123abcd.tmp").exists()


@pytest.mark.parametrize("name", ["notes.txt", ".ckpt", ".hidden.ckpt", "a/b.ckpt", "../up.ckpt"])
def test_a_manifest_still_names_only_checkpoint_files(tmp_path, name):
    write_ckpt(tmp_path, "last.ckpt", 1.0)
    path = tmp_path / "lightning_cp=last.ckpt.manifest.json"
    doc = json.loads(path.read_text())
    doc["files"][name] = doc["files"].pop("last.ckpt")
    path.write_text(json.dumps(doc))
    with pytest.raises(CorruptCheckpointError, match="not a valid ksuit manifest"):
        read_manifest(tmp_path, path.name)
