"""torchrun worker: every rank writes its half of a sharded set of large DTensors (rows of
`shard_rows(tensor, rank)`), so a test can rebuild any full tensor without holding the set."""

import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from ksuit.storage import PendingFile, SetWriter

MIB = 1 << 20
COLUMNS = 1024


def shard_rows(index: int, rank: int, rows: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * index + rank)
    return torch.randn(rows, COLUMNS, generator=g)


def full_tensor(index: int, world: int, total_rows: int) -> torch.Tensor:
    per = total_rows // world
    return torch.cat([shard_rows(index, r, per) for r in range(world)])


def main() -> None:
    out, total_mib, tensors = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    rows = total_mib * MIB // tensors // (4 * COLUMNS)
    state = {
        f"w{i}": DTensor.from_local(shard_rows(i, rank, rows // world), mesh, [Shard(0)], run_check=False)
        for i in range(tensors)
    }
    payload = {"state_dict": state, "run_id": "big"}
    SetWriter(out).write([PendingFile("big_cp=latest_model.dcp", payload, "dcp", "model", "big", "latest")])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
