from pathlib import Path

import pytest

from ksuit.callbacks import BestCheckpointCallback, Callback, CheckpointCallback
from ksuit.readers import list_checkpoints
from ksuit.schemas.run import load_run_config
from ksuit.storage import load_file
from ksuit.trainers.runner import prepare_run, run

TINY = Path(__file__).parents[1] / "e2e" / "tiny_autoencoder.yaml"


def tiny(tmp_path, *overrides, **kwargs):
    return prepare_run(load_run_config(TINY, list(overrides)), tmp_path, "run", **kwargs)


def files(prepared):
    return sorted((c.model_name, c.info, c.tag, c.role) for c in list_checkpoints(prepared.run_dir))


def test_the_tiny_runs_files(tmp_path):
    prepared = tiny(tmp_path)
    run(prepared)
    found = files(prepared)
    enc, dec, ae = "autoencoder.encoder", "autoencoder.decoder", "autoencoder"
    # encoder weights every 2 epochs, no trainer file with them (no optimizer state)
    assert (enc, "", "E2_U16_S128", "model") in found
    assert not any(t == "E2_U16_S128" and m in (dec, ae) and i == "" for m, i, t, k in found)
    # latest and last: weights, optimizer states, trainer
    for tag in ("latest", "last"):
        for name in (enc, dec):
            assert (name, "", tag, "model") in found and (name, "", tag, "optim") in found
        assert (ae, "", tag, "trainer") in found
    # best weights only
    assert (enc, "", "best_model.loss.val", "model") in found
    assert (enc, "", "best_model.loss.val", "optim") not in found
    # latest holds the end of training; no stray trainer files for progress tags
    latest = load_file(prepared.path_provider.checkpoint_path / "autoencoder.encoder_cp=latest_model.th")
    assert latest["training_iteration"] == {"epoch": 3, "update": 24, "sample": 192}
    assert not [f for f in found if f[3] == "trainer" and f[2] not in ("latest", "last")]


def test_progress_saves_with_optimizer_state_are_resumable(tmp_path):
    prepared = tiny(tmp_path, "callbacks=[{kind: checkpoint, every_n_epochs: 1, save_last: false}]")
    run(prepared)
    tags = {c.tag for c in list_checkpoints(prepared.run_dir) if c.role == "trainer"}
    assert tags == {"E1_U8_S64", "E2_U16_S128", "E3_U24_S192"}


def test_disk_estimate_is_logged_before_training(tmp_path, caplog):
    prepared = tiny(tmp_path)
    with caplog.at_level("INFO", logger="ksuit"):
        run(prepared)
    assert "checkpoints of 'checkpoint.2' (autoencoder.encoder, autoencoder.decoder): 'latest'" in caplog.text
    estimate = prepared.trainer.callbacks[2].estimated_bytes
    on_disk = {  # last's optimizer and trainer files are hard links of latest's: their bytes once
        c.path.stat().st_ino: c.size_bytes
        for c in list_checkpoints(prepared.run_dir)
        if c.tag in ("latest", "last") and c.info == ""
    }
    actual = sum(on_disk.values())
    assert 0.5 * actual < estimate < 2 * actual


def test_checkpoint_callback_checks_its_arguments(tmp_path):
    with pytest.raises(ValueError, match="saves nothing"):
        CheckpointCallback(save_weights=False, save_optim=False)
    prepared = tiny(tmp_path, "callbacks=[{kind: checkpoint, every_n_epochs: 1, model_names: [encodr]}]")
    with pytest.raises(ValueError, match="unknown submodel 'encodr'"):
        run(prepared)


class BestAtStart(Callback):
    """Records the best-checkpoint callback's value and iteration when training starts."""

    saves_state = False  # not in the trainer file, so the resume accepts it

    def __init__(self):
        super().__init__("best_at_start")
        self.seen = None

    def before_training(self, trainer):
        best = next(cb for cb in trainer.callbacks if isinstance(cb, BestCheckpointCallback))
        self.seen = (best.best_value, best.best_iteration)


def test_best_checkpoint_tag_state_and_resume(tmp_path):
    cb = BestCheckpointCallback("loss/val")
    assert cb.tag == "best_model.loss.val" and cb.every_n_epochs == 1
    assert cb.is_better(1.0) and not cb.is_better(float("nan"))
    prepared = tiny(tmp_path, "trainer.max_epochs=2")
    run(prepared)
    best = prepared.trainer.callbacks[3]
    assert best.best_value <= prepared.trainer.metrics["loss/val"]
    state = best.state_dict()
    assert state["metric_key"] == "loss/val" and state["best_value"] is not None
    saved = load_file(prepared.path_provider.checkpoint_path / "autoencoder_cp=last_trainer.th")
    assert saved["callback_state_dicts"]["best_checkpoint"] == state
    weights = load_file(
        prepared.path_provider.checkpoint_path / "autoencoder.encoder_cp=best_model.loss.val_model.th"
    )
    assert weights["training_iteration"] == state["best_iteration"]
    # a resumed run continues from the saved best value
    resumed = tiny(tmp_path, "trainer.max_epochs=3", resume=True)
    probe = BestAtStart()
    resumed.trainer.callbacks.append(probe)
    run(resumed)
    assert probe.seen == (state["best_value"], state["best_iteration"])  # loaded before the first update
    final = resumed.trainer.callbacks[3]
    assert final.best_value == min(state["best_value"], resumed.trainer.metrics["loss/val"])
    with pytest.raises(ValueError, match="saved state is for 'loss/train'"):
        BestCheckpointCallback("loss/val").load_state_dict({"metric_key": "loss/train", "best_value": 1.0})


def test_best_checkpoint_needs_its_metric(tmp_path):
    prepared = tiny(tmp_path, "callbacks=[{kind: best_checkpoint, metric_key: loss/test}]")
    with pytest.raises(KeyError, match="watches metric 'loss/test', which no callback logged"):
        run(prepared)


def test_higher_is_better(tmp_path):
    cb = BestCheckpointCallback("acc", higher_is_better=True)
    cb.best_value = 0.5
    assert cb.is_better(0.6) and not cb.is_better(0.4)
