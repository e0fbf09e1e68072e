"""A plain PyTorch loop (no ksuit trainer) for `test_loop.py`, as the README shows it.

`python loop_worker.py OUT STEPS [--slow-saves]` trains a small MLP with AdamW, a StepLR
schedule, dropout and batches drawn from torch's generator, saving `latest` every `SAVE_EVERY`
steps and resuming from the newest complete set in `OUT/run`. With `--slow-saves`, every file a
save writes prints `in-save` once written and pauses, so a test can SIGKILL the process in the
middle of a save.
"""

from __future__ import annotations

import os
import sys
import time

import torch
from torch import nn

import ksuit

SAVE_EVERY = 5
BATCH = 16


def train(out: str, steps: int) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic in every process
    try:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
        model = ksuit.models.wrap(net, "mlp", optimizer=opt)
        loop = ksuit.LoopState(scheduler=sched)
        with ksuit.CheckpointWriter(ksuit.PathProvider(out, "run"), loop) as writer:
            ksuit.resume(f"{out}/run", model, loop)
            while loop.step < steps:
                x = torch.randn(BATCH, 8)
                loss = (net(x) - x.sum(1, keepdim=True)).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                loop.step += 1
                loop.sample += BATCH
                if loop.step % SAVE_EVERY == 0:
                    writer.save(model, "latest", trainer=loop)
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
    train(sys.argv[1], int(sys.argv[2]))
