"""A tiny, deterministic Lightning run for `test_lightning.py` (no shuffling, no dropout: a
resumed run can match an uninterrupted one bit for bit).

`python lightning_app.py DIR EPOCHS [--slow-saves]` runs it in a process of its own; with
`--slow-saves` every checkpoint file written prints `in-save` and pauses, so a test can SIGKILL
the process in the middle of a save.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ksuit.integrations.lightning import KsuitCheckpointIO


class Regressor(L.LightningModule):
    def __init__(self, lr: float = 0.05, extra: Any = None):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, _):
        x, y = batch
        return (self.net(x) - y).pow(2).mean()

    def validation_step(self, batch, _):
        x, y = batch
        # a wobble, so the top-k files are not simply the newest ones
        self.log("val_loss", (self.net(x) - y).pow(2).mean() + 0.3 * math.sin(self.current_epoch))

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)]


def loaders() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    data = TensorDataset(x, x.sum(1, keepdim=True) + 0.1 * torch.randn(32, 1, generator=g))
    return DataLoader(data, batch_size=8), DataLoader(data, batch_size=16)


def fit(
    dirpath: str, epochs: int, ckpt_path: str | None = None, **plugin_options: Any
) -> tuple[Regressor, L.Trainer, ModelCheckpoint]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic in every process
    try:
        L.seed_everything(0, verbose=False)
        model = Regressor()
        checkpoints = ModelCheckpoint(dirpath=dirpath, save_top_k=2, monitor="val_loss", save_last=True)
        trainer = L.Trainer(
            max_epochs=epochs,
            callbacks=[checkpoints],
            plugins=[KsuitCheckpointIO(**{"async_save": True, **plugin_options})],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            accelerator="cpu",
        )
        trainer.fit(model, *loaders(), ckpt_path=ckpt_path)
        return model, trainer, checkpoints
    finally:
        torch.set_num_threads(threads)


def slow_saves() -> None:
    from ksuit.storage.formats import TorchFormat

    real = TorchFormat.write

    def write(self, payload, sink):
        real(self, payload, sink)
        os.write(1, b"in-save\n")
        time.sleep(0.3)

    TorchFormat.write = write


if __name__ == "__main__":
    if "--slow-saves" in sys.argv:
        slow_saves()
    fit(sys.argv[1], int(sys.argv[2]))
