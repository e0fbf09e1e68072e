"""What the sharded end-to-end tests train with (imported by their configs via PYTHONPATH):

- `indexed_data`: the synthetic data, each sample with its index, so a test can tell which
  samples each update consumed;
- `RecordingTrainer`: reconstruction, writing `(epoch, update, indices)` of every batch of this
  rank to `$KSUIT_TEST_SAMPLE_LOG.<rank>`;
- `DumpState`: writes the full (gathered) weights and optimizer states of every leaf, right
  before training and after it, to `$KSUIT_TEST_DUMP.<before|after>` (rank 0): what a resume
  loaded, and what the last save saved.
"""

import json
import os

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ksuit.callbacks import Callback
from ksuit.data.datasets import synthetic
from ksuit.trainers.base import BaseTrainer


class Indexed(Dataset):
    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i][0], i


def indexed_data(num_samples: int = 120, dim: int = 8, latent_dim: int = 3, seed: int = 0) -> dict:
    return {"train": Indexed(synthetic(num_samples, dim, latent_dim, val_fraction=0.0, seed=seed)["train"])}


class RecordingTrainer(BaseTrainer):
    def loss(self, model, batch):
        x, index = batch
        log = os.environ.get("KSUIT_TEST_SAMPLE_LOG")
        if log:
            counter = self.update_counter
            with open(f"{log}.{self.rank}", "a") as f:
                f.write(
                    json.dumps({"epoch": counter.epoch, "update": counter.update, "index": index.tolist()})
                    + "\n"
                )
        return F.mse_loss(model(x), x)


def _full(value):
    if isinstance(value, torch.Tensor):
        return value.full_tensor() if hasattr(value, "full_tensor") else value.clone()
    if isinstance(value, dict):
        return {k: _full(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_full(v) for v in value)
    return value


class DumpState(Callback):
    """Keeps no state of its own (`state_dict` is empty), so resumes match with or without it."""

    def _dump(self, trainer, when: str) -> None:
        path = os.environ.get("KSUIT_TEST_DUMP")
        if not path:
            return
        state = {}
        for name, leaf in trainer.model.iter_leaves():  # every rank gathers: full_tensor is a collective
            state[name] = {
                "model": _full(leaf.state_dict()),
                "optim": _full(leaf.optimizer.state_dict()) if leaf.optimizer is not None else None,
            }
        if trainer.rank == 0:
            torch.save(state, f"{path}.{when}")

    def before_training(self, trainer) -> None:
        self._dump(trainer, "before")

    def after_training(self, trainer) -> None:
        self._dump(trainer, "after")
