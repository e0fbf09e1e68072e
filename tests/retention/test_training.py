"""Where retention is set (the run config's top level, a checkpoint callback, `BaseTrainer`), that
it runs on the writer's own thread for asynchronous saves, that the trainer's metrics reach the
manifests, and the disk estimate logged before training."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from ksuit.providers import PathProvider
from ksuit.retention import RetentionPolicy
from ksuit.schemas.run import ConfigError, load_run_config
from ksuit.storage import LocalBackend
from ksuit.trainers import BaseTrainer
from ksuit.trainers.runner import prepare_run, run
from ksuit.writers import CheckpointWriter
from tests.retention.helpers import progress_tags

TINY = Path(__file__).parents[1] / "e2e" / "tiny_autoencoder.yaml"
EVERY_EPOCH = (
    "callbacks.1={kind: checkpoint, every_n_epochs: 1, save_weights: true, save_optim: true, "
    "save_last: false}"
)


def tiny(tmp_path, *overrides, **kwargs):
    return prepare_run(
        load_run_config(TINY, [EVERY_EPOCH, "trainer.max_epochs=4", *overrides]), tmp_path, "run", **kwargs
    )


def test_top_level_retention_of_the_run_config(tmp_path):
    prepared = tiny(tmp_path, "retention={keep_last: 1}")
    run(prepared)
    assert prepared.trainer.checkpoint_writer.retention == RetentionPolicy(keep_last=1)
    assert progress_tags(prepared.run_dir) == ["E4_U32_S256"]


def test_retention_under_a_checkpoint_callback(tmp_path):
    prepared = tiny(tmp_path, "callbacks.1.retention={keep_every_epochs: 2}", "callbacks.2.every_n_updates=8")
    run(prepared)
    assert progress_tags(prepared.run_dir) == ["E2_U16_S128", "E4_U32_S256"]


def test_retention_set_twice_is_an_error_naming_both(tmp_path):
    with pytest.raises(ConfigError, match="callbacks.1.retention: retention is also set at the top level"):
        tiny(tmp_path, "retention={keep_last: 1}", "callbacks.1.retention={keep_last: 2}")
    with pytest.raises(
        ConfigError, match="retention.keep_lats: unknown key 'keep_lats'; did you mean 'keep_last'"
    ):
        tiny(tmp_path, "retention={keep_lats: 1}")
    prepared = tiny(tmp_path, "callbacks.1.retention={keep_last: 2}")
    prepared.trainer.retention = RetentionPolicy(keep_last=1)
    with pytest.raises(ValueError, match="retention is set more than once"):
        run(prepared)


def test_asynchronous_saves_delete_on_the_writer_thread(tmp_path, monkeypatch):
    threads = []
    real = LocalBackend.delete_set

    def delete_set(self, manifest):
        threads.append(threading.current_thread().name)
        real(self, manifest)

    monkeypatch.setattr(LocalBackend, "delete_set", delete_set)
    prepared = tiny(tmp_path, "retention={keep_last: 1}", "trainer.async_save=true")
    run(prepared)
    assert threads and all(name.startswith("ksuit-writer:") for name in threads)
    assert progress_tags(prepared.run_dir) == ["E4_U32_S256"]


def test_the_trainer_records_its_latest_metrics_in_every_manifest(tmp_path):
    prepared = tiny(tmp_path)
    run(prepared)
    folder = prepared.path_provider.checkpoint_path
    manifest = json.loads((folder / "autoencoder_cp=E4_U32_S256.manifest.json").read_text())
    assert set(manifest["metrics"]) == {"loss/train", "loss/val"}
    assert manifest["metrics"]["loss/val"] == pytest.approx(prepared.trainer.metrics["loss/val"])
    ema = json.loads((folder / "autoencoder.encoder_ema=0.9_cp=latest.manifest.json").read_text())
    assert set(ema["metrics"]) == {"loss/train", "loss/val"}  # files callbacks add to the save too


def estimate(prepared, caplog) -> int:
    """What the every-epoch checkpoint callback estimates before the first update (no training)."""
    trainer = prepared.trainer
    trainer.setup(prepared.model, prepared.datasets["train"])
    callback = trainer.callbacks[1]
    with caplog.at_level("INFO", logger="ksuit"):
        callback.before_training(trainer)
    return callback.estimated_bytes


def test_the_estimate_counts_what_the_policy_keeps_and_warns_about_free_space(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(CheckpointWriter, "free_bytes", lambda self: 1000)
    kept = estimate(tiny(tmp_path, "retention={keep_last: 1}", "trainer.max_epochs=20"), caplog)
    assert "20 progress saves of" in caplog.text and "at most 2 kept at once" in caplog.text
    assert "under retention (keep_last 1)" in caplog.text
    assert "but the disk of" in caplog.text and "has 1000 B free" in caplog.text
    everything = estimate(tiny(tmp_path / "all", "trainer.max_epochs=20"), caplog)
    assert everything > 5 * kept


def test_the_trainer_takes_a_policy_as_a_mapping(tmp_path):
    trainer = BaseTrainer(
        PathProvider(tmp_path, "r"), effective_batch_size=4, max_epochs=1, retention={"keep_last": 3}
    )
    assert trainer.retention == RetentionPolicy(keep_last=3)
