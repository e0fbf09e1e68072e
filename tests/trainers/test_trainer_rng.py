import io
import random

import numpy as np
import pytest
import torch

from ksuit.trainers import rng


def draw():
    return random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), torch.rand(3).tolist()


def test_capture_restore_roundtrip():
    random.gauss(0, 1)  # leaves a cached gauss value in python's state
    state = rng.capture()
    first = draw()
    draw()
    rng.restore(state)
    assert draw() == first


def test_state_is_plain_and_loads_weights_only():
    state = rng.capture_all_ranks()
    assert state["world_size"] == 1
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    first = draw()
    rng.restore_own_rank(loaded)
    assert draw() == first


def test_restore_refuses_another_world_size_and_foreign_states():
    state = rng.capture_all_ranks()
    with pytest.raises(
        ValueError, match=r"written by 2 process\(es\) but this run has 1.*--nproc_per_node=2"
    ):
        rng.restore_own_rank({"world_size": 2, "ranks": state["ranks"] * 2})
    with pytest.raises(ValueError, match="lacks numpy"):
        rng.restore({"python": state["ranks"][0]["python"], "torch": torch.get_rng_state()})
