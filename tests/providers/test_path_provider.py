import re

import pytest

from ksuit.providers import PathProvider


def test_paths_and_creation(tmp_path):
    pp = PathProvider(tmp_path, "run1")
    assert pp.run_id == "run1"
    assert pp.run_output_path == tmp_path / "run1"
    assert not (tmp_path / "run1").exists()
    assert pp.checkpoint_path == tmp_path / "run1" / "checkpoints"
    assert not (tmp_path / "run1").exists()  # no I/O: the storage backend creates the folders


def test_stage_name(tmp_path):
    pp = PathProvider(str(tmp_path), "run1", stage_name="finetune")
    assert pp.checkpoint_path == tmp_path / "run1" / "finetune" / "checkpoints"


def test_generate_run_id_is_unique_and_safe():
    ids = {PathProvider.generate_run_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(re.fullmatch(r"\d{8}_\d{6}_[0-9a-f]{6}", i) for i in ids)


@pytest.mark.parametrize("bad", ["", "a/b", "..", "../x", ".hidden", "a\0b"])
def test_bad_run_ids_rejected(tmp_path, bad):
    with pytest.raises(ValueError, match="run_id"):
        PathProvider(tmp_path, bad)
