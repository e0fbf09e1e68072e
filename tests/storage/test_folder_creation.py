"""Run folders are created durably, also when another writer creates the same parents at the
same moment (two runs of one output root saving at once)."""

from pathlib import Path

import pytest

from ksuit.storage.local.files import make_folder_durable


def test_a_parent_created_by_another_writer_between_two_looks_is_used_not_refused(tmp_path, monkeypatch):
    out = tmp_path / "out"
    target = out / "a" / "checkpoints"
    is_dir = Path.is_dir
    raced = []

    def racing_is_dir(self):
        found = is_dir(self)
        if self == out and not found and not raced:  # the other writer makes it right after this look
            raced.append(True)
            out.mkdir()
        return found

    monkeypatch.setattr(Path, "is_dir", racing_is_dir)
    assert make_folder_durable(target) == target
    assert raced and is_dir(target)


def test_a_file_in_the_way_is_still_refused(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="in the way"):
        make_folder_durable(tmp_path / "out" / "a" / "checkpoints")
