"""`python sharded_kill_worker.py FOLDER_URL`: commits a sharded set (seed 0) to the S3 folder,
prints `committed`, then starts the next sharded save (seed 1) and, in the middle of its
multipart upload of the model's part (one 5 MiB part sent, the upload open), prints `uploading`
and waits to be SIGKILLed. The endpoint and credentials come from the environment."""

from __future__ import annotations

import sys
import time

import torch

from ksuit.storage import PendingFile, SetWriter
from ksuit.storage.objectstore.backend import ObjectStoreBackend

MODEL = "big_cp=latest_model.dcp"
OPTIM = "big_cp=latest_optim.dcp"
ITERATION = {"epoch": 0, "update": 1, "sample": 4}
STORAGE = {"ksuit_part_size": 5 << 20, "ksuit_concurrency": 2}
PARTS_BEFORE_KILL = 6 << 20


def weights(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"state_dict": {"w": torch.randn(3 << 20, generator=g)}, "run_id": "r"}  # 12 MiB: multipart


def files(seed: int) -> list[PendingFile]:
    optim = {"state": {0: {"step": torch.tensor(float(seed))}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    return [
        PendingFile(MODEL, weights(seed), "dcp", "model", "big", "latest", ITERATION),
        PendingFile(OPTIM, optim, "dcp", "optim", "big", "latest", ITERATION),
        PendingFile(
            "big_cp=latest_trainer.th", {"seed": seed}, "torch", "trainer", "big", "latest", ITERATION
        ),
    ]


class Stall:
    """A write stream that stops for good once `PARTS_BEFORE_KILL` bytes went through."""

    def __init__(self, out):
        self.out = out

    def write(self, data) -> int:
        n = self.out.write(data)
        if self.out.tell() >= PARTS_BEFORE_KILL:
            print("uploading", flush=True)
            time.sleep(600)
        return n

    def __getattr__(self, name):
        return getattr(self.out, name)


def main(url: str) -> None:
    from ksuit.storage.locations import open_backend, set_storage_options

    set_storage_options(url, STORAGE)
    writer = SetWriter(open_backend(url))
    writer.write(files(0), run_id="r")
    print("committed", flush=True)
    write_part = ObjectStoreBackend.write_part

    def stalling(self, staged, part, write, expected_nbytes=0):
        if staged.name == MODEL and part.startswith("__"):
            return write_part(self, staged, part, lambda out: write(Stall(out)), expected_nbytes)
        return write_part(self, staged, part, write, expected_nbytes)

    ObjectStoreBackend.write_part = stalling
    writer.write(files(1), run_id="r")
    print("saved (not expected)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
