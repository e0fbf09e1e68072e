"""Retention on S3 (moto over HTTP): a writer's policy and `ksuit prune`/`pin` delete sets through
the object store's `delete_set` (hidden by one head swap, then their objects go), and the bytes
a progress tag and `latest` share are stored once."""

from __future__ import annotations

from typer.testing import CliRunner

from ksuit.cli import app
from ksuit.providers import PathProvider
from ksuit.readers import scan_sets
from ksuit.retention import RetentionPolicy
from ksuit.storage import open_backend, set_storage_options
from ksuit.utils.training import TrainingIteration, UpdateCounter
from ksuit.writers import CheckpointWriter
from ksuit.zoo.autoencoder import Autoencoder
from tests.conftest import FakeTrainer, autoencoder_config, train_one_step


def train_and_save(pp: PathProvider, saves: int, **writer_options) -> None:
    model = Autoencoder(autoencoder_config()).initialize()
    counter = UpdateCounter(None, TrainingIteration(epoch=30), updates_per_epoch=20, effective_batch_size=4)
    with CheckpointWriter(pp, counter, **writer_options) as writer:
        for _ in range(saves):
            train_one_step(model)
            counter.next_update()
            trainer = FakeTrainer(counter)
            writer.save(
                model,
                str(counter.cur_iteration),
                trainer=trainer,
                save_latest_weights=True,
                save_latest_optim=True,
            )


def progress_tags(run) -> list[str]:
    return sorted(s.tag for s in scan_sets(run) if s.tag.startswith("E"))


def test_a_writer_policy_keeps_what_it_says_and_the_store_drops_the_rest(s3):
    pp = PathProvider(f"{s3.url}/runs", "run", storage_options={"ksuit_reader_grace": 0})
    try:
        train_and_save(pp, 5, retention=RetentionPolicy(keep_last=2))
        assert progress_tags(pp.run_output_path) == ["E0_U4_S0", "E0_U5_S0"]
        assert all(s.ok for s in scan_sets(pp.run_output_path, checksum=True))
        backend = open_backend(pp.checkpoint_path)
        head = backend.read_head(fresh=True).head
        live = {ref.key for ref in backend.view().files.values()}
        data = {k.split("checkpoints/", 1)[1] for k in s3.keys("runs/run/checkpoints/.ksuit/data/")}
        assert data - live <= set(head.retired), "objects of deleted sets are retired or gone"
        backend.repair(0)
        data = {k.split("checkpoints/", 1)[1] for k in s3.keys("runs/run/checkpoints/.ksuit/data/")}
        assert data == live
    finally:
        set_storage_options(f"{s3.url}/runs", None)


def test_prune_and_pin_work_on_s3_urls(s3):
    pp = PathProvider(f"{s3.url}/runs", "run")
    train_and_save(pp, 4)
    runner = CliRunner()
    result = runner.invoke(app, ["pin", pp.run_output_path, "E0_U1_S0"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["prune", pp.run_output_path, "--keep-last", "1"])
    assert result.exit_code == 0, result.output
    assert progress_tags(pp.run_output_path) == ["E0_U1_S0", "E0_U4_S0"]
    result = runner.invoke(app, ["verify", pp.run_output_path])
    assert result.exit_code == 0, result.output


def test_files_of_one_save_with_the_same_bytes_share_one_object(s3):
    """The optimizer state written under a progress tag and `latest` by one save is one object
    (the local disk uses a hard link), counted once."""
    pp = PathProvider(f"{s3.url}/runs", "run")
    train_and_save(pp, 1)
    backend = open_backend(pp.checkpoint_path)
    files = backend.view().files
    latest, progress = "autoencoder.encoder_cp=latest_optim.th", "autoencoder.encoder_cp=E0_U1_S0_optim.th"
    assert files[latest].key == files[progress].key
    data = s3.keys("runs/run/checkpoints/.ksuit/data/")
    assert len(data) == len({ref.key for ref in files.values()}) < len(files)
    entries = {e.name: e for e in backend.entries()}
    assert entries[latest].file_id == entries[progress].file_id
    assert all(s.ok for s in scan_sets(pp.run_output_path, checksum=True))
