import io

import pytest
import torch

from ksuit.trainers import metrics
from ksuit.trainers.metrics import MetricTracker


def losses(total, part):
    return {"total": torch.tensor(total), "recon": torch.tensor(part)}


def test_log_and_fresh_keep_the_update_of_each_metric():
    tracker = MetricTracker()
    tracker.log("loss/val", 0.5, update=4)
    tracker.log("accuracy", 1, update=5)
    assert tracker.values == {"loss/val": 0.5, "accuracy": 1.0}
    assert isinstance(tracker.values["accuracy"], float)
    assert tracker.updates == {"loss/val": 4, "accuracy": 5}
    assert tracker.fresh(5) == {"accuracy": 1.0} and tracker.fresh(6) == {}


def test_mean_losses_over_an_epoch_then_new_sums():
    tracker = MetricTracker()
    tracker.add_losses(losses(1.0, 0.25))
    tracker.add_losses(losses(3.0, 0.75))
    tracker.log_mean_losses(update=2, device=torch.device("cpu"))
    assert tracker.values == {"loss/train": 2.0, "loss/train/recon": 0.5}
    assert tracker.updates == {"loss/train": 2, "loss/train/recon": 2}
    tracker.add_losses(losses(5.0, 1.0))
    tracker.log_mean_losses(update=3, device=torch.device("cpu"))
    assert tracker.values["loss/train"] == 5.0  # the sums started over


def test_state_roundtrip_mid_epoch_continues_the_same_mean():
    tracker = MetricTracker()
    tracker.log("loss/val", 0.5, update=4)
    tracker.add_losses(losses(1.0, 0.25))
    buffer = io.BytesIO()
    torch.save(tracker.state_dict(), buffer)
    buffer.seek(0)
    resumed = MetricTracker()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.state_dict() == tracker.state_dict()
    for t in (tracker, resumed):
        t.add_losses(losses(3.0, 0.75))
        t.log_mean_losses(update=8, device=torch.device("cpu"))
    assert resumed.values == tracker.values == {"loss/val": 0.5, "loss/train": 2.0, "loss/train/recon": 0.5}


def test_a_state_without_metrics_starts_empty():
    tracker = MetricTracker()
    tracker.log("x", 1.0, update=1)
    tracker.load_state_dict({"callback_state_dicts": {}})
    assert tracker.values == {} and tracker.updates == {} and tracker.loss_updates == 0


def _as_rank(monkeypatch, rank, world, gathered=None):
    monkeypatch.setattr(metrics.distributed, "rank", lambda group=None: rank)
    monkeypatch.setattr(metrics.distributed, "world_size", lambda group=None: world)
    if gathered is not None:
        monkeypatch.setattr(metrics.distributed, "all_gather_object", lambda obj: gathered)


TWO_RANKS = [{"sums": {"total": 1.0}, "updates": 1}, {"sums": {"total": 3.0}, "updates": 2}]


def test_every_rank_keeps_its_own_loss_sums_through_a_checkpoint(monkeypatch):
    """Each rank sums its own losses; the trainer file (written by rank 0) keeps all of them,
    so a resume on as many ranks continues every rank's sums exactly."""
    _as_rank(monkeypatch, 0, 2, gathered=TWO_RANKS)
    saved = MetricTracker().state_dict()
    assert saved["train_loss"] == {"ranks": TWO_RANKS}
    for rank, entry in enumerate(TWO_RANKS):
        _as_rank(monkeypatch, rank, 2)
        resumed = MetricTracker()
        resumed.load_state_dict(saved)
        assert (resumed.loss_sums, resumed.loss_updates) == (entry["sums"], entry["updates"])


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_on_another_world_size_rank_0_takes_every_sum(monkeypatch, rank):
    _as_rank(monkeypatch, rank, 3)
    resumed = MetricTracker()
    resumed.load_state_dict({"train_loss": {"ranks": TWO_RANKS}})
    expected = ({"total": 4.0}, 3) if rank == 0 else ({}, 0)
    assert (resumed.loss_sums, resumed.loss_updates) == expected


def test_a_file_with_one_rank_s_sums_counts_them_once(monkeypatch):
    """Files written before every rank's sums were kept hold `{"sums", "updates"}`: rank 0 takes
    them, the other ranks start at zero (not a copy each, which would count them twice)."""
    old = {"train_loss": {"sums": {"total": 2.0}, "updates": 2}}
    for rank, expected in ((0, ({"total": 2.0}, 2)), (1, ({}, 0))):
        _as_rank(monkeypatch, rank, 2)
        resumed = MetricTracker()
        resumed.load_state_dict(old)
        assert (resumed.loss_sums, resumed.loss_updates) == expected


@pytest.mark.parametrize(
    "train_loss",
    [
        {"ranks": "xy"},
        {"ranks": [{"sums": {"total": "1.0"}, "updates": 1}]},
        {"ranks": [{"sums": {"total": 1.0}, "updates": -1}]},
        {"ranks": [{"sums": {"total": 1.0}}]},
        {"sums": [1.0], "updates": 1},
        [1, 2],
    ],
)
def test_a_malformed_train_loss_is_refused_by_name(monkeypatch, train_loss):
    """A trainer file is untrusted: loss sums of the wrong shape are a clear error, never a
    TypeError from deep inside nor a resumed run with wrong sums."""
    _as_rank(monkeypatch, 0, 1)
    tracker = MetricTracker()
    with pytest.raises(ValueError, match="train_loss is not"):
        tracker.load_state_dict({"train_loss": train_loss})
    assert (tracker.loss_sums, tracker.loss_updates) == ({}, 0)
