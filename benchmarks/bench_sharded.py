"""Sharded checkpoint benchmark: ksuit's sharded saves against torch.distributed.checkpoint.

Two processes under torchrun (CPU, gloo) hold a sharded state: the tensors of `bench_state`
(a few large, hundreds of small; ~1 GiB of weights at `--scale 1`) as DTensors split by rows
over the ranks, plus an AdamW-like state twice that size. Measured, each method in rotated
order over `--rounds` rounds (median), every save into a fresh folder with its files fsynced:

- sync save throughput: ksuit (`SetWriter`, the whole commit protocol: staged folders, xxh3
  checksums, manifest, journal, switch) against `dcp.save` (`FileSystemWriter`); goal >= 0.95x;
- async save, time the training thread is blocked: ksuit's `AsyncSetWriter` (snapshot of each
  rank's shards into reused buffers, DCP on a dedicated gloo group) against `dcp.async_save`
  (its default stager, the same dedicated group); goal: less;
- replicated (DDP) state: rank 0 writing `.th` files alone against every rank writing a share
  through DCP (`CheckpointWriter(spread_replicated=True)`);
- consolidation of the sharded weights into one `.th`, each in a fresh process: `ksuit export`
  (streaming) against `dcp_to_torch_save` (whole state in memory): seconds and peak extra RSS.

Usage: `python benchmarks/bench_sharded.py --out benchmarks/results_sharded.json [--scale 0.1]`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
MIB = 1 << 20


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }


# ---- the two ranks (torchrun workers) ---------------------------------------------------------


def _state(scale: float, mesh: Any, rank: int, world: int) -> tuple[dict, dict]:
    """Sharded weights (rows split over ranks) and an AdamW-like state (two tensors per weight)."""
    import torch
    from bench_state import tensor_sizes
    from torch.distributed.tensor import DTensor, Shard

    weights, optim = {}, {}
    for i, numel in enumerate(tensor_sizes(scale)):
        rows = max(world, numel // 256 // world * world)
        local = torch.full((rows // world, 256), float(i + rank))
        weights[f"p{i}"] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
        optim[i] = {
            "step": torch.tensor(10.0),
            "exp_avg": DTensor.from_local(local * 0.5, mesh, [Shard(0)], run_check=False),
            "exp_avg_sq": DTensor.from_local(local * 0.25, mesh, [Shard(0)], run_check=False),
        }
    return {"state_dict": weights, "run_id": "bench"}, {
        "state": optim,
        "param_groups": [{"lr": 1e-3, "params": list(optim)}],
    }


def _nbytes(obj: Any) -> int:
    from ksuit.storage.formats import iter_tensors

    return sum(t.numel() * t.element_size() for t in iter_tensors(obj))


def _files(weights: dict, optim: dict | None, fmt: str = "dcp") -> list:
    from ksuit.storage import PendingFile

    ext = "dcp" if fmt == "dcp" else "th"
    files = [PendingFile(f"bench_cp=latest_model.{ext}", weights, fmt, "model", "bench", "latest")]
    if optim is not None:
        files.append(PendingFile(f"bench_cp=latest_optim.{ext}", optim, fmt, "optim", "bench", "latest"))
    return files


def worker(folder: Path, scale: float, rounds: int) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    from ksuit.storage import AsyncSetWriter, SetWriter

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    side = dist.new_group(backend="gloo")  # what a background save's collectives run on
    weights, optim = _state(scale, mesh, rank, world)
    total = _nbytes(weights) + _nbytes(optim)  # this rank's shards
    state_bytes = [0] * world
    dist.all_gather_object(state_bytes, total)
    results: dict[str, list[float]] = {}
    blocked: dict[str, list[float]] = {}
    async_writer = AsyncSetWriter(SetWriter(folder / "ksuit_async", group=side))

    def timed(name: str, fn: Any) -> None:
        dist.barrier()
        start = time.perf_counter()
        fn()
        dist.barrier()
        results.setdefault(name, []).append(time.perf_counter() - start)

    def ksuit_sync(n: int) -> None:
        SetWriter(folder / f"ksuit_sync_{n}").write(_files(weights, optim))

    def dcp_sync(n: int) -> None:
        state = {"model": weights["state_dict"], "optim": optim["state"]}
        dcp.save(state, checkpoint_id=str(folder / f"dcp_sync_{n}"))

    def ksuit_async(n: int) -> None:
        start = time.perf_counter()
        async_writer.write_set(_files(weights, optim))
        blocked.setdefault("ksuit_async", []).append(time.perf_counter() - start)
        async_writer.flush()

    def dcp_async(n: int) -> None:
        start = time.perf_counter()
        future = dcp.async_save(
            {"model": weights["state_dict"], "optim": optim["state"]},
            checkpoint_id=str(folder / f"dcp_async_{n}"),
            process_group=side,
        )
        blocked.setdefault("dcp_async", []).append(time.perf_counter() - start)
        (getattr(future, "upload_completion", None) or future).result()

    replicated = {k: v.full_tensor() for k, v in weights["state_dict"].items()}

    def rank0_th(n: int) -> None:
        if rank == 0:
            SetWriter(folder / f"rank0_th_{n}").write(_files({"state_dict": replicated}, None, "torch"))

    def spread_dcp(n: int) -> None:
        SetWriter(folder / f"spread_{n}").write(_files({"state_dict": replicated}, None))

    methods = {
        "ksuit_sync": ksuit_sync,
        "dcp_sync": dcp_sync,
        "ksuit_async": ksuit_async,
        "dcp_async": dcp_async,
        "replicated_rank0_th": rank0_th,
        "replicated_spread_dcp": spread_dcp,
    }
    names = list(methods)
    for n in range(rounds + 1):  # round 0 warms up (imports, first allocations); not counted
        for name in names[n % len(names) :] + names[: n % len(names)]:
            timed(name, lambda name=name, n=n: methods[name](n))
        if n == 0:
            results.clear()
            blocked.clear()
        dist.barrier()
        if rank == 0 and n < rounds:  # the last round's folders stay: consolidation reads one
            for path in folder.iterdir():
                if path.is_dir() and path.name.endswith(f"_{n}"):
                    shutil.rmtree(path, ignore_errors=True)
    async_writer.close()
    if rank == 0:
        report = {
            "state_bytes": sum(state_bytes),
            "replicated_bytes": _nbytes(replicated),
            "seconds": {k: statistics.median(v) for k, v in results.items()},
            "blocked": {k: statistics.median(v) for k, v in blocked.items()},
        }
        (folder / "workers.json").write_text(json.dumps(report))
    dist.destroy_process_group()


# ---- consolidation (fresh processes) ----------------------------------------------------------

CONSOLIDATE = """
import json, resource, sys, time
from pathlib import Path
method, source, target = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
if method == "ksuit":
    from ksuit.storage import open_backend
    from ksuit.storage.sharded.consolidate import export_sharded
    from ksuit.storage.sharded.load import read_folder_metadata
    folder = open_backend(source.parent).child(source.name)
    read_folder_metadata(folder)
    run = lambda: export_sharded(folder, "torch", open_backend(target.parent), target.name)
else:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    run = lambda: dcp_to_torch_save(source, target)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
run()
seconds = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_extra": (after - before) * 1024}))
"""


def consolidate(method: str, source: Path, target: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CONSOLIDATE, method, str(source), str(target)],
        capture_output=True,
        text=True,
        env=_env(),
    )
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    target.unlink(missing_ok=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- main -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "results_sharded.json")
    parser.add_argument("--scale", type=float, default=1.0, help="state size factor (1.0: ~1 GiB weights)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=HERE / ".bench_sharded")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.dir, args.scale, args.rounds)
        return
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(Path(__file__).resolve()), "--worker", "--dir", str(args.dir), "--scale", str(args.scale),
        "--rounds", str(args.rounds),
    ]  # fmt: skip
    subprocess.run(command, check=True, env=_env())
    report = json.loads((args.dir / "workers.json").read_text())
    weights = args.dir / f"ksuit_sync_{args.rounds}" / "bench_cp=latest_model.dcp"
    report["consolidate"] = {
        "ksuit_export": consolidate("ksuit", weights, args.dir / "ksuit.th"),
        "dcp_to_torch_save": consolidate("dcp", weights, args.dir / "dcp.th"),
    }
    s, b = report["seconds"], report["blocked"]
    gb = report["state_bytes"] / 1e9
    report["ratios"] = {
        "sync_throughput_ksuit_over_dcp": s["dcp_sync"] / s["ksuit_sync"],
        "async_blocked_ksuit_over_dcp": b["ksuit_async"] / b["dcp_async"],
        "replicated_spread_over_rank0_time": s["replicated_spread_dcp"] / s["replicated_rank0_th"],
    }
    report["scale"] = args.scale
    args.out.write_text(json.dumps(report, indent=1))
    c = report["consolidate"]
    print(f"sharded state {gb:.2f} GB on 2 ranks (median of {args.rounds} rounds)")
    print(
        f"  sync save   ksuit {gb / s['ksuit_sync']:.2f} GB/s   dcp.save {gb / s['dcp_sync']:.2f} GB/s   "
        f"ratio {report['ratios']['sync_throughput_ksuit_over_dcp']:.2f} (goal >= 0.95)"
    )
    print(
        f"  async save  blocked: ksuit {b['ksuit_async'] * 1e3:.0f} ms   "
        f"dcp.async_save {b['dcp_async'] * 1e3:.0f} ms"
    )
    print(
        f"  replicated  rank 0 .th {s['replicated_rank0_th']:.2f} s   "
        f"spread over ranks {s['replicated_spread_dcp']:.2f} s"
    )
    for name, r in c.items():
        if "error" in r:
            print(f"  consolidate {name}: {r['error']}")
        else:
            print(f"  consolidate {name}: {r['seconds']:.2f} s, peak extra {r['peak_extra'] / MIB:.0f} MiB")
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
