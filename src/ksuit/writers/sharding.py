"""The process group asynchronous sharded saves run on (which leaves are sharded:
`ksuit.models.sharding.is_sharded`)."""

from __future__ import annotations

from typing import Any

from ksuit.models.sharding import is_sharded
from ksuit.utils import distributed

__all__ = ["is_sharded", "sharded_group"]

_GROUP: Any = None
_GROUP_OF: Any = None  # the default group it was made with (a new one after re-initializing)


def sharded_group() -> Any:
    """A gloo process group of every rank, created once per process (a collective: every rank
    calls it at the same point), for the collectives of sharded saves written in a background
    thread while training uses the default group."""
    global _GROUP, _GROUP_OF
    if not distributed.is_distributed():
        return None
    import torch.distributed as dist

    if _GROUP is None or _GROUP_OF is not dist.group.WORLD:
        _GROUP, _GROUP_OF = dist.new_group(backend="gloo"), dist.group.WORLD
    return _GROUP
