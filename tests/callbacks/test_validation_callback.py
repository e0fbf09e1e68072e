from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ksuit.callbacks.validation import batch_len
from ksuit.schemas.run import load_run_config
from ksuit.trainers.runner import prepare_run, run

TINY = Path(__file__).parents[1] / "e2e" / "tiny_autoencoder.yaml"


def test_validation_loss_is_the_sample_weighted_mean(tmp_path):
    prepared = prepare_run(
        load_run_config(TINY, ["trainer.max_epochs=1", "callbacks=[{kind: validation_loss, batch_size: 5}]"]),
        tmp_path,
        "run",
    )
    run(prepared)
    model = prepared.model.eval()
    x = torch.stack([item[0] for item in prepared.datasets["val"]])
    with torch.no_grad():
        expected = F.mse_loss(model(x), x).item()
    assert prepared.trainer.metrics["loss/val"] == pytest.approx(expected, rel=1e-5)
    assert prepared.trainer.metric_updates["loss/val"] == 8
    assert model.training is False  # left as we set it; training mode is restored inside the run


def test_unknown_dataset_is_named(tmp_path):
    prepared = prepare_run(
        load_run_config(TINY, ["callbacks=[{kind: validation_loss, dataset: test}]"]), tmp_path, "run"
    )
    with pytest.raises(
        KeyError, match="evaluates dataset 'test', which the run does not have \\(known: train, val\\)"
    ):
        run(prepared)


def test_batch_len():
    assert batch_len(torch.zeros(3, 2)) == 3
    assert batch_len((torch.zeros(4, 1), torch.zeros(4))) == 4
    assert batch_len({"x": torch.zeros(2, 5)}) == 2
    with pytest.raises(TypeError):
        batch_len("text")
