import io
import random
import subprocess
import sys

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


def test_another_world_size_rederives_from_seed_update_and_rank():
    state = rng.capture_all_ranks()
    event = rng.restore_own_rank({"world_size": 2, "ranks": state["ranks"] * 2}, seed=7, update=30)
    assert event == {
        "from_world_size": 2,
        "world_size": 1,
        "update": 30,
        "seed": 7,
        "derived_seed": rng.derived_seed(7, 30, 0),
    }
    first = draw()
    rng.restore_own_rank({"world_size": 3, "ranks": state["ranks"] * 3}, seed=7, update=30)
    assert draw() == first  # deterministic: the same (seed, update, rank), the same numbers
    seeds = {rng.derived_seed(7, 30, r) for r in range(4)} | {
        rng.derived_seed(7, 31, 0),
        rng.derived_seed(8, 30, 0),
    }
    assert len(seeds) == 6


SHARED_STORAGE = """
import torch
from ksuit.trainers import rng
states = [rng.capture() for _ in range(2)]
states[1]["torch"] = torch.manual_seed(5).get_state()
first = torch.rand(3)
packed = torch.cat([states[0]["torch"], states[1]["torch"]])
rng.restore({**states[1], "torch": packed[states[0]["torch"].numel():]})
assert torch.equal(torch.rand(3), first)
"""


def test_restore_reads_a_state_that_shares_its_storage():
    # an asynchronous save packs the ranks' uint8 states into one storage: rank 1's state is a
    # view at an offset, which torch.set_rng_state misread (a segmentation fault, so: in a
    # process of its own)
    done = subprocess.run([sys.executable, "-c", SHARED_STORAGE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def test_restore_refuses_foreign_states():
    state = rng.capture_all_ranks()
    with pytest.raises(ValueError, match="lacks numpy"):
        rng.restore({"python": state["ranks"][0]["python"], "torch": torch.get_rng_state()})
