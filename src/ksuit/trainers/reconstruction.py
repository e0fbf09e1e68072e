"""`ReconstructionTrainer`: a ready-made trainer for the zoo's autoencoder (importable, so run
configs can name it: `trainer: {kind: ksuit.trainers.reconstruction.ReconstructionTrainer}`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ksuit.trainers.base import BaseTrainer


class ReconstructionTrainer(BaseTrainer):
    """Mean squared error between a batch and the model's output for it (an autoencoder's loss).

    A batch is a tensor or a list/tuple whose first item is the input, e.g. a `TensorDataset`'s `(x,)`.
    """

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return F.mse_loss(model(x).float(), x.float())
