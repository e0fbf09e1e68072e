"""What crash safety costs: a ~1 GiB state saved three ways in one run.

1. `torch.save(state, path)`: the common baseline; returns once the bytes are in the page
   cache, so a crash or power loss soon after can still lose or tear the file.
2. `torch.save` + `os.fsync`: the same, but durable (what a careful user would write).
3. `CheckpointWriter.save_model_checkpoint`: ksuit's full protocol: temporary name, xxh3-64
   checksum while streaming, fsync, manifest, journal, rename, folder fsync.

Methods are interleaved per repetition (A B C A B C ...) so a noisy neighbour hits each alike;
the median of the repetitions is reported. Also timed: xxh3-64 of the same bytes in memory, the
checksum's share. Results go to `benchmarks/results_overhead.json`.

    .venv/bin/python benchmarks/bench_overhead.py [--gib 1.0] [--reps 3] [--dir /path/on/target/disk]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import xxhash

from ksuit.providers import PathProvider
from ksuit.utils.training import TrainingIteration, UpdateCounter
from ksuit.writers.checkpoint_writer import CheckpointWriter

RESULTS = Path(__file__).with_name("results_overhead.json")
MIB = 1 << 20


def make_state(gib: float) -> dict[str, torch.Tensor]:
    """15/16 of the bytes in 15 large tensors, 1/16 in 1024 small ones (biases, norms)."""
    total = int(gib * 1024 * MIB)
    large_numel = total * 15 // 16 // 15 // 4
    small_numel = total // 16 // 1024 // 4
    gen = torch.Generator().manual_seed(0)
    state = {}
    for i in range(1024):
        state[f"small.{i}"] = torch.empty(small_numel).uniform_(-1, 1, generator=gen)
        if i % 69 == 0 and len([k for k in state if k.startswith("large")]) < 15:
            state[f"large.{i}"] = torch.empty(large_numel).uniform_(-1, 1, generator=gen)
    while len([k for k in state if k.startswith("large")]) < 15:
        state[f"large.extra{len(state)}"] = torch.empty(large_numel).uniform_(-1, 1, generator=gen)
    return state


def state_nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def bare_save(state, folder: Path) -> float:
    path = folder / "bare.th"
    start = time.perf_counter()
    torch.save({"state_dict": state}, path)
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def save_fsync(state, folder: Path) -> float:
    path = folder / "fsync.th"
    start = time.perf_counter()
    with open(path, "wb") as f:
        torch.save({"state_dict": state}, f)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def ksuit_save(state, folder: Path) -> float:
    provider = PathProvider(folder, "run")
    counter = UpdateCounter(None, TrainingIteration(epoch=1), updates_per_epoch=1, effective_batch_size=1)
    writer = CheckpointWriter(provider, counter)
    checkpoints = provider.checkpoint_path
    start = time.perf_counter()
    writer.save_model_checkpoint("bench_cp=latest_model.th", state, "latest")
    seconds = time.perf_counter() - start
    shutil.rmtree(checkpoints)
    return seconds


def hash_only(state, folder: Path) -> float:
    start = time.perf_counter()
    h = xxhash.xxh3_64()
    for t in state.values():
        h.update(t.numpy().data)
    return time.perf_counter() - start


METHODS = {
    "torch.save (no fsync)": bare_save,
    "torch.save + fsync": save_fsync,
    "ksuit save_model_checkpoint": ksuit_save,
    "xxh3-64 of the bytes (in memory)": hash_only,
}


def sync_page_cache() -> None:
    """Writes back dirty pages of earlier repetitions so they do not slow the next one."""
    os.sync()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="state size in GiB")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per method (median reported)")
    parser.add_argument(
        "--dir", type=Path, default=None, help="folder on the disk to measure (default: a temp dir)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    state = make_state(args.gib)
    nbytes = state_nbytes(state)
    base = Path(tempfile.mkdtemp(prefix="ksuit-bench-", dir=args.dir))
    print(f"state: {len(state)} tensors, {nbytes / MIB:.0f} MiB; writing under {base}", flush=True)
    times: dict[str, list[float]] = {name: [] for name in METHODS}
    try:
        for rep in range(args.reps):
            for name, fn in METHODS.items():
                sync_page_cache()
                seconds = fn(state, base)
                times[name].append(seconds)
                print(f"  rep {rep + 1}/{args.reps} {name:34s} {seconds:7.3f} s", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    median = {name: statistics.median(ts) for name, ts in times.items()}
    bare, durable, ksuit = (
        median["torch.save (no fsync)"],
        median["torch.save + fsync"],
        median["ksuit save_model_checkpoint"],
    )
    print()
    print(f"{'method':36s} {'median s':>9s} {'GiB/s':>7s} {'vs bare':>8s}")
    for name, seconds in median.items():
        print(f"{name:36s} {seconds:9.3f} {nbytes / (1 << 30) / seconds:7.2f} {seconds / bare:7.2f}x")
    print(
        f"\nksuit / bare torch.save = {ksuit / bare:.2f}x; "
        f"ksuit / (torch.save + fsync) = {ksuit / durable:.2f}x"
    )
    result = {
        "benchmark": "bench_overhead",
        "state_bytes": nbytes,
        "tensors": len(state),
        "repetitions": args.reps,
        "seconds": times,
        "median_seconds": median,
        "ratio_ksuit_vs_bare_torch_save": ksuit / bare,
        "ratio_ksuit_vs_torch_save_fsync": ksuit / durable,
        "ratio_fsync_vs_bare": durable / bare,
        "machine": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg_at_end": os.getloadavg(),
            "disk": str(base.parent),
        },
        "note": "CPUs shared with other jobs; page cache synced before each repetition",
    }
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
