import io

import torch

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
    assert (
        tracker.values == {} and tracker.updates == {} and tracker.state_dict()["train_loss"]["updates"] == 0
    )
