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


def test_url_roots_stay_urls():
    pp = PathProvider("s3://bucket/runs/", "run1", stage_name="finetune")
    assert pp.is_remote
    assert pp.run_output_path == "s3://bucket/runs/run1/finetune"
    assert pp.checkpoint_path == "s3://bucket/runs/run1/finetune/checkpoints"
    assert PathProvider("memory://runs", "r").checkpoint_path == "memory://runs/r/checkpoints"


def test_storage_options_are_a_dict():
    assert PathProvider("s3://b/runs", "r", storage_options={"anon": False}).storage_options == {
        "anon": False
    }
    with pytest.raises(TypeError, match="storage_options must be a dict"):
        PathProvider("s3://b/runs", "r", storage_options=["anon"])


def test_the_writer_registers_the_storage_options_of_its_root(s3, monkeypatch):
    """Options given to PathProvider reach every reader of the run in the process, not only the
    writer (resume, EMA, `ksuit.load_model`)."""
    import torch

    from ksuit.readers import list_checkpoints
    from ksuit.storage import load_file, set_storage_options
    from ksuit.utils.training import TrainingIteration, UpdateCounter
    from ksuit.writers import CheckpointWriter

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    pp = PathProvider(f"{s3.url}/runs", "r", storage_options={"endpoint_url": s3.endpoint.url})
    counter = UpdateCounter(None, TrainingIteration(epoch=1), updates_per_epoch=2, effective_batch_size=1)
    try:
        with CheckpointWriter(pp, counter) as writer:
            writer.save_model_checkpoint("m_cp=latest_model.th", {"w": torch.ones(2)}, "latest")
        assert [c.name for c in list_checkpoints(pp.run_output_path)] == ["m_cp=latest_model.th"]
        assert load_file(f"{pp.checkpoint_path}/m_cp=latest_model.th")["state_dict"]["w"].sum() == 2
    finally:
        set_storage_options(f"{s3.url}/runs", None)
