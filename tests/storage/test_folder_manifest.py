"""Folder manifests: a folder another framework wrote is complete exactly when its manifest,
written last after every file was made durable, matches every file."""

import json
import os

import pytest

from ksuit.layout import FOLDER_MANIFEST, is_ksuit_filename, is_temp_filename
from ksuit.storage import LocalBackend
from ksuit.storage.errors import CorruptCheckpointError, UnsafeCheckpointError
from ksuit.storage.folder_manifest import (
    folder_files,
    folder_problems,
    read_folder_manifest,
    write_folder_manifest,
)


@pytest.fixture
def checkpoint(tmp_path):
    """A folder like a Hugging Face checkpoint-<n>, with a subfolder like DeepSpeed's."""
    folder = tmp_path / "checkpoint-4"
    (folder / "global_step4").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(os.urandom(3000))
    (folder / "optimizer.pt").write_bytes(os.urandom(5000))
    (folder / "trainer_state.json").write_text('{"global_step": 4}')
    (folder / "global_step4" / "shard_0.pt").write_bytes(os.urandom(700))
    return folder


def test_a_marked_folder_verifies_and_records_every_file(checkpoint):
    manifest = write_folder_manifest(checkpoint, {"update": 4}, written_by="test")
    assert sorted(manifest.files) == [
        "global_step4/shard_0.pt",
        "model.safetensors",
        "optimizer.pt",
        "trainer_state.json",
    ]
    assert manifest.files["optimizer.pt"].size == 5000
    assert read_folder_manifest(checkpoint).files == manifest.files
    assert read_folder_manifest(checkpoint).training_iteration == {"update": 4}
    assert folder_problems(checkpoint) == {}
    assert not [p for p in checkpoint.iterdir() if p.name.endswith(".tmp")]


def test_files_are_made_durable_before_the_manifest_is_written(checkpoint, monkeypatch):
    events = []
    real_durable, real_write = LocalBackend.make_durable, LocalBackend.write_file

    def durable(self, names):
        events.append(("durable", self.path.name, tuple(sorted(names))))
        return real_durable(self, names)

    def write(self, name, *args, **kwargs):
        events.append(("write", self.path.name, name))
        return real_write(self, name, *args, **kwargs)

    monkeypatch.setattr(LocalBackend, "make_durable", durable)
    monkeypatch.setattr(LocalBackend, "write_file", write)
    write_folder_manifest(checkpoint)
    assert events == [
        ("durable", "global_step4", ("shard_0.pt",)),  # the subfolder first, then its parent
        ("durable", "checkpoint-4", ("model.safetensors", "optimizer.pt", "trainer_state.json")),
        ("write", "checkpoint-4", FOLDER_MANIFEST),
    ]


@pytest.mark.parametrize(
    ("damage", "name", "problem"),
    [
        (lambda f: (f / "optimizer.pt").write_bytes(b"x" * 100), "optimizer.pt", "size 100 != 5000"),
        (lambda f: (f / "model.safetensors").write_bytes(os.urandom(3000)), "model.safetensors", "checksum"),
        (lambda f: (f / "global_step4" / "shard_0.pt").unlink(), "global_step4/shard_0.pt", "missing"),
        (lambda f: (f / "scheduler.pt").write_bytes(b"late"), "scheduler.pt", "not listed in the manifest"),
        (lambda f: (f / FOLDER_MANIFEST).unlink(), FOLDER_MANIFEST, "never marked complete"),
        (lambda f: (f / FOLDER_MANIFEST).write_text("{"), FOLDER_MANIFEST, "not a valid ksuit folder"),
    ],
)  # fmt: skip
def test_a_damaged_or_unfinished_folder_is_reported(checkpoint, damage, name, problem):
    write_folder_manifest(checkpoint)
    damage(checkpoint)
    problems = folder_problems(checkpoint)
    assert list(problems) == [name]
    assert problem in problems[name]


def test_sizes_only_reads_no_file(checkpoint, monkeypatch):
    write_folder_manifest(checkpoint)
    (checkpoint / "model.safetensors").write_bytes(os.urandom(3000))  # same size, other bytes
    monkeypatch.setattr(LocalBackend, "checksum", lambda self, name: pytest.fail(f"read {name}"))
    assert folder_problems(checkpoint, checksum=False) == {}


@pytest.mark.parametrize(
    "name", ["../escape", "/etc/passwd", "a//b", "./x", "a/../b", "x\\y", "a/" * 12 + "b"]
)
def test_a_manifest_naming_files_outside_its_folder_is_refused(checkpoint, name):
    (checkpoint / FOLDER_MANIFEST).write_text(
        json.dumps({"version": 1, "files": {name: {"size": 1, "checksum": "0" * 16}}})
    )
    with pytest.raises(CorruptCheckpointError, match="not a valid ksuit folder manifest"):
        read_folder_manifest(checkpoint)
    assert FOLDER_MANIFEST in folder_problems(checkpoint)


def test_a_folder_with_a_link_is_not_marked_complete(checkpoint, tmp_path):
    (tmp_path / "outside.bin").write_bytes(b"secret")
    (checkpoint / "model.bin").symlink_to(tmp_path / "outside.bin")
    with pytest.raises(UnsafeCheckpointError, match="model.bin is a symbolic link"):
        write_folder_manifest(checkpoint)
    assert not (checkpoint / FOLDER_MANIFEST).exists()


def test_ksuit_temporary_files_are_not_part_of_a_folder(checkpoint):
    (checkpoint / f".{FOLDER_MANIFEST}.0123abcd.tmp").write_text("{")  # a manifest write cut short
    write_folder_manifest(checkpoint)
    assert f".{FOLDER_MANIFEST}.0123abcd.tmp" not in folder_files(checkpoint)
    assert folder_problems(checkpoint) == {}
    assert is_temp_filename(f".{FOLDER_MANIFEST}.0123abcd.tmp") and is_ksuit_filename(FOLDER_MANIFEST)
