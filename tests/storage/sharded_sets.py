"""Sharded checkpoint sets written in this process (one rank, no process group): what the
storage tests of sharded folders build on."""

from __future__ import annotations

from pathlib import Path

import torch

from ksuit.storage import PendingFile, SetWriter

MODEL = "m_cp=latest_model.dcp"
OPTIM = "m_cp=latest_optim.dcp"
TRAINER = "m_cp=latest_trainer.th"
ITERATION = {"epoch": 0, "update": 1, "sample": 4}


def weights(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "state_dict": {
            "net.0.weight": torch.randn(6, 4, generator=g),
            "net.0.bias": torch.randn(6, generator=g),
        },
        "checkpoint_tag": "latest",
        "run_id": "r",
        "model_config": {"kind": "x", "name": "m"},
    }


def optim_state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed + 100)
    return {
        "state": {
            0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(6, 4, generator=g)},
            1: {"step": torch.tensor(3.0), "exp_avg": torch.randn(6, generator=g)},
        },
        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0, 1]}],
    }


def sharded_files(seed: int = 0) -> list[PendingFile]:
    return [
        PendingFile(MODEL, weights(seed), "dcp", "model", "m", "latest", ITERATION),
        PendingFile(OPTIM, optim_state(seed), "dcp", "optim", "m", "latest", ITERATION),
        PendingFile(TRAINER, {"seed": torch.tensor(seed)}, "torch", "trainer", "m", "latest", ITERATION),
    ]


def write_sharded_set(folder: Path, seed: int = 0) -> None:
    SetWriter(folder).write(sharded_files(seed), run_id="r")
