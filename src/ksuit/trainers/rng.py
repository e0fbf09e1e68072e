"""Random number generator states as plain values, so trainer files load with `weights_only=True`.

One rank's state is `{"python": ..., "numpy": ..., "torch": ByteTensor, "cuda": [ByteTensor]}`:
python's Mersenne Twister as a version, an int64 tensor of its 625 words and the cached gauss
value; numpy's legacy global generator as its bit generator name, an int64 tensor of its keys
and its position/gauss fields. `capture_all_ranks()` gathers one such dict per rank.
`seed_everything` seeds the same generators.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ksuit.utils import distributed

# torch leaves torch.cuda.is_initialized unannotated; this is its signature
_cuda_is_initialized: Callable[[], bool] = torch.cuda.is_initialized


def seed_everything(seed: int) -> None:
    """Seeds python's, numpy's and torch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture() -> dict[str, Any]:
    """This process's python, numpy, torch CPU (and CUDA, when present) generator states."""
    version, words, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": int(version),
            "state": torch.tensor(list(words), dtype=torch.int64),
            "gauss_next": None if gauss_next is None else float(gauss_next),
        },
        "numpy": {
            "bit_generator": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and _cuda_is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore(state: dict[str, Any]) -> None:
    """Sets this process's generators to a state from `capture()`."""
    missing = [k for k in ("python", "numpy", "torch") if k not in state]
    if missing:
        raise ValueError(f"RNG state lacks {', '.join(missing)}; it was not written by ksuit.trainers.rng")
    py = state["python"]
    words = tuple(int(w) for w in torch.as_tensor(py["state"]).tolist())
    random.setstate((int(py["version"]), words, py["gauss_next"]))
    npy = state["numpy"]
    keys = np.asarray(torch.as_tensor(npy["keys"]).numpy(), dtype=np.uint32)
    np.random.set_state(
        (npy["bit_generator"], keys, int(npy["pos"]), int(npy["has_gauss"]), float(npy["cached_gaussian"]))
    )
    # a tensor of its own: a loaded state may view a storage shared with other ranks' states (an
    # asynchronous save packs tensors of one dtype together), which set_rng_state misreads
    torch.set_rng_state(_own_bytes(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])
        if len(cuda_states) != torch.cuda.device_count():
            raise ValueError(
                f"RNG state holds {len(cuda_states)} CUDA generator states but this process sees "
                f"{torch.cuda.device_count()} CUDA devices; resume with the same devices"
            )
        torch.cuda.set_rng_state_all([_own_bytes(s) for s in cuda_states])


def _own_bytes(value: Any) -> torch.Tensor:
    """A generator state as a uint8 CPU tensor with a storage of its own (offset 0)."""
    return torch.as_tensor(value, dtype=torch.uint8).cpu().clone(memory_format=torch.contiguous_format)


def capture_all_ranks() -> dict[str, Any]:
    """`{"world_size": W, "ranks": [state of rank 0, ..., state of rank W-1]}` (a collective)."""
    states = distributed.all_gather_object(capture())
    return {"world_size": len(states), "ranks": states}


def check_world_size(saved: int) -> None:
    """Refuses a checkpoint written by another number of processes than this run has, for
    loops whose data order ksuit does not own (`ksuit.LoopState`); ksuit's trainer resumes
    elastically instead (`restore_own_rank` with a seed)."""
    current = distributed.world_size()
    if saved != current:
        hint = (
            f"torchrun --nproc_per_node={saved} ..." if saved > 1 else "a single process (without torchrun)"
        )
        raise ValueError(
            f"the checkpoint was written by {saved} process(es) but this run has {current}; "
            f"resume with the same world size: {hint}"
        )


def derived_seed(seed: int, update: int, rank: int) -> int:
    """The seed of rank `rank` when a run resumes at `update` on another world size: a fixed
    function of the three (numpy's SeedSequence mixing), so such a resume is reproducible."""
    entropy = [seed % 2**64, update % 2**64, rank % 2**64]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] % 2**63)


def restore_own_rank(all_ranks: dict[str, Any], seed: int = 0, update: int = 0) -> dict[str, int] | None:
    """Restores this rank's entry of `capture_all_ranks()`. A checkpoint of another world size
    has no state for this rank's place: the generators are then seeded with
    `derived_seed(seed, update, rank)`, and what was done is returned (None when restored)."""
    saved = int(all_ranks["world_size"])
    current, rank = distributed.world_size(), distributed.rank()
    if saved == current:
        restore(all_ranks["ranks"][rank])
        return None
    derived = derived_seed(seed, update, rank)
    seed_everything(derived)
    return {
        "from_world_size": saved,
        "world_size": current,
        "update": update,
        "seed": seed,
        "derived_seed": derived,
    }
