"""Save/load benchmark: ksuit against torch.save, safetensors and torch.distributed.checkpoint,
and the performance goals of issue 14, each reported as MET or MISS with its ratio.

One run, one synthetic state (`bench_state.py`: ~1 GiB of weights in 8 large and 400 small
tensors plus an AdamW state twice that size, at `--scale 1`). Every method runs in a fresh
subprocess that builds the state, resets its peak-RSS mark (`/proc/self/clear_refs`), runs, and
reports seconds and peak extra resident memory (`VmHWM` minus the RSS before the method).
Files are fsynced by every save method. Every file to be loaded is read through once after it is
written (a virtual disk's host caches what was read before, which favoured whichever loader came
second), and before each load its pages are dropped from this machine's page cache
(`posix_fadvise(DONTNEED)`). Each load also touches every page of every tensor, so lazy (mmap)
loads pay for the bytes they return. Loader targets compare loaders on the same file; each load
runs three times in rotated order and the median counts. The goals (`goals.py`) compare two
things measured in one process in rotated rounds, or, for resume, in fresh processes in rotated
rounds. Modules: `harness.py` (measuring, processes), `methods.py` (saves and loads), `goals.py`,
`report.py` (targets and the printed report).

Usage: `python benchmarks/bench_save_load.py --out benchmarks/results.json [--scale 0.1]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import goals  # noqa: E402
import methods  # noqa: E402
from harness import GIB, spawn  # noqa: E402
from report import evaluate, gbps, print_report  # noqa: E402

SAVE_METHODS = [
    "raw_buffered",
    "raw_odirect",
    "memcpy",
    "ksuit_sync_torch",
    "ksuit_sync_torch_buffered",
    "ksuit_sync_torch_crc",
    "ksuit_sync_safetensors",
    "ksuit_async",
    "ksuit_async_unprepared",
    "ksuit_async_small",
    "many_files",
    "torch_save",
    "safetensors_save",
    "dcp_save",
    "dcp_async_save",
]
NO_BENCH_STATE = {"ksuit_async_small", "many_files"}  # build their own state
ROUNDS = 3
LOAD_METHODS = [
    "load_torch",
    "load_torch_mmap",
    "load_safetensors",
    "load_ksuit_th",
    "load_ksuit_safetensors",
    "load_torch_mmap_of_ksuit_file",
    "load_safetensors_of_ksuit_file",
]
RESUME_METHODS = ["resume_ksuit", "resume_torch_mmap"]
PREPARE = {"prepare_loads": methods.prepare_load_files, "prepare_resume": goals.prepare_resume_files}


def _method(name: str) -> Any:
    return getattr(goals, f"m_{name}", None) or getattr(methods, f"m_{name}")


def run_child(method: str, scale: float, folder: Path, files: dict | None) -> dict:
    """Runs one method in this (fresh) process; returns its measurements."""
    from bench_state import build_model, state_nbytes

    ctx: dict[str, Any] = {"scale": scale, "dir": folder, "files": files or {}}
    if method.startswith(("load_", "resume_")) or method in NO_BENCH_STATE:
        return _method(method)(ctx)
    start = time.perf_counter()
    model = build_model(scale)
    weights, optim = state_nbytes(model)
    ctx.update(model=model, state_bytes=weights + optim)
    if method in PREPARE:
        return {"files": PREPARE[method](ctx), "weights_bytes": weights, "optim_bytes": optim}
    result = _method(method)(ctx)
    for key, value in {"state_bytes": weights + optim, "weights_bytes": weights}.items():
        result.setdefault(key, value)
    result["build_seconds"] = time.perf_counter() - start
    return result


def _rounds(names: list[str], scale: float, folder: Path, files: dict | None) -> dict[str, dict]:
    """Each method `ROUNDS` times in fresh processes, the order rotated per round; the median
    run of each (the virtual disk's host cache favours later readers of a file)."""
    runs: dict[str, list[dict]] = {m: [] for m in names}
    for round_ in range(ROUNDS):
        shift = round_ % max(1, len(names))
        for method in names[shift:] + names[:shift]:
            print(f"running {method} (round {round_ + 1}) ...", file=sys.stderr, flush=True)
            runs[method].append(spawn(method, scale, folder, files))
    results = {}
    for method, rs in runs.items():
        ok = sorted((r for r in rs if "seconds" in r), key=lambda r: r["seconds"])
        results[method] = (
            dict(ok[len(ok) // 2], rounds=[r["seconds"] for r in rs if "seconds" in r]) if ok else rs[0]
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "results.json", help="JSON results file")
    parser.add_argument("--scale", type=float, default=1.0, help="state size factor (1.0: ~1 GiB weights)")
    parser.add_argument("--dir", type=Path, default=None, help="target folder (default: benchmarks/.bench)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these methods")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--files", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(run_child(args.child, args.scale, args.dir, json.loads(args.files))))
        return

    root = args.dir or HERE / ".bench"
    shutil.rmtree(root, ignore_errors=True)
    results: dict[str, dict] = {}
    wanted = args.only
    started = time.time()
    for method in SAVE_METHODS:
        if wanted and method not in wanted:
            continue
        print(f"running {method} ...", file=sys.stderr, flush=True)
        results[method] = spawn(method, args.scale, root / method)
        shutil.rmtree(root / method, ignore_errors=True)
    prep: dict = {}
    for names, step, folder in (
        (LOAD_METHODS, "prepare_loads", root / "load"),
        (RESUME_METHODS, "prepare_resume", root / "resume"),
    ):
        chosen = [m for m in names if not wanted or m in wanted]
        if chosen:
            prep = spawn(step, args.scale, folder)
            results.update(_rounds(chosen, args.scale, folder, prep.get("files")))
            shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)

    any_r = next((r for r in results.values() if "weights_bytes" in r), {})
    meta = {
        "scale": args.scale,
        "state_bytes": any_r.get("state_bytes", prep.get("weights_bytes", 0) + prep.get("optim_bytes", 0)),
        "weights_bytes": any_r.get("weights_bytes", prep.get("weights_bytes", 0)),
        "machine": {
            "cpus": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": __import__("torch").__version__,
            "gpu": None,  # goal 5 needs one; none on the machines this ran on so far
        },
        "target_dir": str(root),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "wall_seconds": round(time.time() - started, 1),
        "command": "python benchmarks/bench_save_load.py " + " ".join(sys.argv[1:]),
    }
    targets = evaluate(results, meta["state_bytes"])
    print_report(results, targets, meta)
    for r in results.values():
        if "seconds" in r and r.get("bytes"):
            r["gbps"] = gbps(r)
    if args.out:
        args.out.write_text(
            json.dumps({"meta": meta, "results": results, "targets": targets}, indent=1) + "\n"
        )
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
