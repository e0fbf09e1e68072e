"""Save/load benchmark: ksuit against torch.save, safetensors and torch.distributed.checkpoint.

One run, one synthetic state (`bench_state.py`: ~1 GiB of weights in 8 large and 400 small
tensors plus an AdamW state twice that size, at `--scale 1`). Every method runs in a fresh
subprocess that builds the state, resets its peak-RSS mark (`/proc/self/clear_refs`), runs, and
reports seconds and peak extra resident memory (`VmHWM` minus the RSS before the method).
Files are fsynced by every save method. Every file to be loaded is read through once after it is
written (a virtual disk's host caches what was read before, which favoured whichever loader came
second), and before each load its pages are dropped from this machine's page cache
(`posix_fadvise(DONTNEED)`). Each load also touches every page of every tensor, so lazy (mmap)
loads pay for the bytes they return. Loader targets compare loaders on the same file; each load
runs three times in rotated order and the median counts.

Usage: `python benchmarks/bench_save_load.py --out benchmarks/results.json [--scale 0.1]`.
"""

from __future__ import annotations

import argparse
import gc
import json
import mmap
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

GIB = 1 << 30
CHUNK = 64 << 20
BOUNCE = 16 << 20

SAVE_METHODS = [
    "raw_buffered",
    "raw_odirect",
    "memcpy",
    "ksuit_sync_torch",
    "ksuit_sync_torch_buffered",
    "ksuit_sync_torch_crc",
    "ksuit_sync_safetensors",
    "ksuit_async",
    "torch_save",
    "safetensors_save",
    "dcp_save",
    "dcp_async_save",
]
LOAD_ROUNDS = 3
LOAD_METHODS = [
    "load_torch",
    "load_torch_mmap",
    "load_safetensors",
    "load_ksuit_th",
    "load_ksuit_safetensors",
    "load_torch_mmap_of_ksuit_file",
    "load_safetensors_of_ksuit_file",
]


# ---- measurement helpers (run inside the method's subprocess) -------------------------------


def _status(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def reset_peak() -> int:
    """Resets the peak-RSS mark; returns the current RSS."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def peak_extra(baseline: int) -> int:
    return max(0, _status("VmHWM") - baseline)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def evict(path: Path) -> None:
    """Drops a file's (clean) pages from the page cache, so the next read hits the disk."""
    paths = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def touch_all(obj: Any) -> float:
    """Reads one element per 4 KiB page of every tensor (faults in lazily mapped data)."""
    from collections import deque

    import torch

    total = 0.0
    queue = deque([obj])  # in order: a model's tensors in its state dict order
    while queue:
        o = queue.popleft()
        if isinstance(o, torch.Tensor):
            if o.numel():
                flat = o.detach().reshape(-1)
                step = max(1, 4096 // flat.element_size())
                total += float(flat[::step].float().sum())
        elif isinstance(o, dict):
            queue.extend(o.values())
        elif isinstance(o, (list, tuple)):
            queue.extend(o)
        elif hasattr(o, "state_dict"):
            queue.append(o.state_dict())
    return total


def plain_state(model) -> dict:
    return {"model": model.state_dict(), "optim": model.optimizer.state_dict()}


def flat_state(model) -> dict:
    """The state as one flat `{name: tensor}` dict, the only shape safetensors stores."""
    flat = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, s in model.optimizer.torch_optim.state_dict()["state"].items():
        for k, v in s.items():
            flat[f"optim.{i}.{k}"] = v
    return flat


# ---- the methods ------------------------------------------------------------------------------


def m_raw_buffered(ctx: dict) -> dict:
    """Buffered `os.write` of the state's bytes in 64 MiB chunks, then fsync: the disk's limit."""
    import torch

    nbytes = ctx["state_bytes"]
    src = torch.ones(min(nbytes, GIB), dtype=torch.uint8)
    view = memoryview(src.numpy())
    path = ctx["dir"] / "raw.bin"
    base = reset_peak()
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    written = 0
    while written < nbytes:
        n = min(CHUNK, nbytes - written)
        off = written % len(view)
        n = min(n, len(view) - off)
        written += os.write(fd, view[off : off + n])
    os.fsync(fd)
    os.close(fd)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "bytes": nbytes, "peak_extra": peak_extra(base)}


def m_raw_odirect(ctx: dict) -> dict:
    """O_DIRECT writes from two 16 MiB aligned bounce buffers (copy and write overlap): the
    device's limit without the page cache."""
    import torch

    nbytes = ctx["state_bytes"] // BOUNCE * BOUNCE
    src = torch.ones(min(nbytes, GIB), dtype=torch.uint8)
    bounce = [mmap.mmap(-1, BOUNCE) for _ in range(2)]
    bounce_t = [torch.frombuffer(b, dtype=torch.uint8) for b in bounce]
    path = ctx["dir"] / "raw_odirect.bin"
    base = reset_peak()
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    pending: threading.Thread | None = None
    errors: list[BaseException] = []

    def write(buf: mmap.mmap) -> None:
        try:
            os.write(fd, buf)
        except BaseException as e:
            errors.append(e)

    for i, off in enumerate(range(0, nbytes, BOUNCE)):
        b = i % 2
        s = off % src.numel()
        bounce_t[b].copy_(src[s : s + BOUNCE])
        if pending is not None:
            pending.join()
        pending = threading.Thread(target=write, args=(bounce[b],))
        pending.start()
    if pending is not None:
        pending.join()
    os.fsync(fd)
    os.close(fd)
    if errors:
        raise errors[0]
    return {"seconds": time.perf_counter() - start, "bytes": nbytes, "peak_extra": peak_extra(base)}


def m_memcpy(ctx: dict) -> dict:
    """Copy of 1 GiB (at scale 1) into memory already touched, and into fresh memory."""
    import torch

    n = max(64 << 20, int(GIB * ctx["scale"]))
    src = torch.ones(n, dtype=torch.uint8)
    dst = torch.zeros(n, dtype=torch.uint8)
    dst.copy_(src)
    start = time.perf_counter()
    dst.copy_(src)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    fresh = torch.empty(n, dtype=torch.uint8)
    fresh.copy_(src)
    cold = time.perf_counter() - start
    return {"seconds": warm, "bytes": n, "fresh_seconds": cold, "fresh_gbps": n / cold / 1e9, "peak_extra": 0}


def _writer(ctx: dict, **kwargs):
    from ksuit.providers import PathProvider
    from ksuit.utils.training import TrainingIteration, UpdateCounter
    from ksuit.writers import CheckpointWriter

    counter = UpdateCounter(None, TrainingIteration(epoch=10), updates_per_epoch=10, effective_batch_size=1)
    return CheckpointWriter(PathProvider(ctx["dir"], "bench"), counter, **kwargs)


def _ksuit_sync(ctx: dict, fmt: str) -> dict:
    model = ctx["model"]
    writer = _writer(ctx, format=fmt)
    base = reset_peak()
    start = time.perf_counter()
    writer.save(model, "E1_U0_S0")
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "bytes": tree_bytes(ctx["dir"]), "peak_extra": peak_extra(base)}


def m_ksuit_sync_torch(ctx: dict) -> dict:
    """`CheckpointWriter.save` (weights + optimizer files, manifest, journal), `.th`."""
    return _ksuit_sync(ctx, "torch")


def m_ksuit_sync_torch_buffered(ctx: dict) -> dict:
    """The same with the O_DIRECT stream switched off (`KSUIT_DIRECT_IO=0`): page-cache writes."""
    os.environ["KSUIT_DIRECT_IO"] = "0"
    return _ksuit_sync(ctx, "torch")


def m_ksuit_sync_torch_crc(ctx: dict) -> dict:
    """The same `.th` save with torch's CRC-32 left on (ksuit turns it off: the manifest's xxh3
    covers every byte): what that option costs."""
    import torch

    from ksuit.storage import formats

    class WithCrc(formats.TorchFormat):
        def write(self, payload, sink):
            torch.save(payload, sink)

    formats.FORMATS["torch"] = WithCrc()
    return _ksuit_sync(ctx, "torch")


def m_ksuit_sync_safetensors(ctx: dict) -> dict:
    """The same with `format="safetensors"` (weights as .safetensors, optimizer as .th)."""
    return _ksuit_sync(ctx, "safetensors")


def m_ksuit_async(ctx: dict) -> dict:
    """`CheckpointWriter(async_save=True)`: a first save (allocates the snapshot buffers), then a
    steady-state save; `blocked` is how long `save()` held the caller, `seconds` until `flush()`."""
    model = ctx["model"]
    writer = _writer(ctx, async_save=True)
    base = reset_peak()
    start = time.perf_counter()
    writer.save(model, "E1_U0_S0")
    first_blocked = time.perf_counter() - start
    writer.flush()
    first_total = time.perf_counter() - start
    start = time.perf_counter()
    writer.save(model, "E2_U0_S0")
    blocked = time.perf_counter() - start
    writer.flush()
    seconds = time.perf_counter() - start
    writer.close()
    return {
        "seconds": seconds,
        "blocked": blocked,
        "first_blocked": first_blocked,
        "first_seconds": first_total,
        "bytes": tree_bytes(ctx["dir"]) // 2,
        "peak_extra": peak_extra(base),
    }


def m_torch_save(ctx: dict) -> dict:
    """`torch.save({"model", "optim"}, f)` (defaults, CRC on) + fsync."""
    import torch

    state = plain_state(ctx["model"])
    path = ctx["dir"] / "state.pt"
    base = reset_peak()
    start = time.perf_counter()
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    return {"seconds": time.perf_counter() - start, "bytes": tree_bytes(path), "peak_extra": peak_extra(base)}


def m_safetensors_save(ctx: dict) -> dict:
    """`safetensors.torch.save_file` of the flattened state + fsync."""
    from safetensors.torch import save_file

    state = flat_state(ctx["model"])
    path = ctx["dir"] / "state.safetensors"
    base = reset_peak()
    start = time.perf_counter()
    save_file(state, str(path))
    fsync_path(path)
    return {"seconds": time.perf_counter() - start, "bytes": tree_bytes(path), "peak_extra": peak_extra(base)}


def _dcp_group() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        dist.init_process_group("gloo", rank=0, world_size=1)


def m_dcp_save(ctx: dict) -> dict:
    """`torch.distributed.checkpoint.save` (single process, gloo group), files fsynced by DCP."""
    import torch.distributed.checkpoint as dcp

    _dcp_group()
    state = plain_state(ctx["model"])
    base = reset_peak()
    start = time.perf_counter()
    dcp.save(state, checkpoint_id=str(ctx["dir"] / "dcp1"))
    return {
        "seconds": time.perf_counter() - start,
        "bytes": tree_bytes(ctx["dir"] / "dcp1"),
        "peak_extra": peak_extra(base),
    }


def m_dcp_async_save(ctx: dict) -> dict:
    """`torch.distributed.checkpoint.async_save` (thread): first and steady-state call."""
    import torch.distributed.checkpoint as dcp

    _dcp_group()
    state = plain_state(ctx["model"])
    base = reset_peak()
    start = time.perf_counter()
    fut = dcp.async_save(state, checkpoint_id=str(ctx["dir"] / "dcp1"))
    first_blocked = time.perf_counter() - start
    _wait(fut)
    first_total = time.perf_counter() - start
    start = time.perf_counter()
    fut = dcp.async_save(state, checkpoint_id=str(ctx["dir"] / "dcp2"))
    blocked = time.perf_counter() - start
    _wait(fut)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "blocked": blocked,
        "first_blocked": first_blocked,
        "first_seconds": first_total,
        "bytes": tree_bytes(ctx["dir"] / "dcp2"),
        "peak_extra": peak_extra(base),
    }


def _wait(fut: Any) -> None:
    upload = getattr(fut, "upload_completion", None)  # AsyncSaveResponse in newer torch
    (upload or fut).result()


# ---- loads (weights file only) ----------------------------------------------------------------


def prepare_load_files(ctx: dict) -> dict:
    """Writes the weights in each format once: torch.save, safetensors, ksuit .th and .safetensors."""
    import torch
    from safetensors.torch import save_file

    model = ctx["model"]
    d = ctx["dir"]
    sd = model.state_dict()
    torch.save(sd, d / "weights.pt")
    save_file(dict(sd), str(d / "weights.safetensors"))
    for fmt in ("torch", "safetensors"):
        writer = _writer(ctx, format=fmt)
        writer.save(model, "E1_U0_S0", save_optim=False)
    files = {
        "torch": d / "weights.pt",
        "safetensors": d / "weights.safetensors",
        "ksuit_th": d / "bench" / "checkpoints" / "bench_cp=E1_U0_S0_model.th",
        "ksuit_safetensors": d / "bench" / "checkpoints" / "bench_cp=E1_U0_S0_model.safetensors",
    }
    for p in files.values():
        fsync_path(p)
        read_once(p)
    return {k: str(v) for k, v in files.items()}


def read_once(path: Path) -> None:
    """Reads a file through once. On a virtual disk the host caches what was read before: the
    first reader of a freshly written file is slower whatever it is (measured: 0.84 s first vs
    0.36-0.46 s after, for either loader). Reading every file once puts all loaders on an equal
    footing; each load still starts with the file dropped from this machine's page cache."""
    with open(path, "rb", buffering=0) as f:
        while f.read(16 << 20):
            pass


def _load(ctx: dict, key: str, fn) -> dict:
    path = Path(ctx["files"][key])
    evict(path)
    base = reset_peak()
    start = time.perf_counter()
    obj = fn(path)
    call = time.perf_counter() - start
    touch_all(obj)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "call_seconds": call,
        "bytes": path.stat().st_size,
        "peak_extra": peak_extra(base),
    }


def m_load_torch(ctx: dict) -> dict:
    """`torch.load(weights_only=True)` of the torch.save weights file."""
    import torch

    return _load(ctx, "torch", lambda p: torch.load(p, weights_only=True))


def m_load_torch_mmap(ctx: dict) -> dict:
    """`torch.load(mmap=True, weights_only=True)`, every page then touched."""
    import torch

    return _load(ctx, "torch", lambda p: torch.load(p, weights_only=True, mmap=True))


def m_load_safetensors(ctx: dict) -> dict:
    """`safetensors.torch.load_file`."""
    from safetensors.torch import load_file

    return _load(ctx, "safetensors", lambda p: load_file(str(p)))


def m_load_torch_mmap_of_ksuit_file(ctx: dict) -> dict:
    """`torch.load(mmap=True)` of ksuit's `.th` weights file: the loader baseline on the same bytes."""
    import torch

    return _load(ctx, "ksuit_th", lambda p: torch.load(p, weights_only=True, mmap=True))


def m_load_safetensors_of_ksuit_file(ctx: dict) -> dict:
    """safetensors' own `load_file` of ksuit's `.safetensors` weights: the baseline on the same bytes."""
    from safetensors.torch import load_file

    return _load(ctx, "ksuit_safetensors", lambda p: load_file(str(p)))


def m_load_ksuit_th(ctx: dict) -> dict:
    """`ksuit.load_model` of the `.th` weights (rebuilds the model from the file)."""
    from ksuit.readers import load_model

    return _load(ctx, "ksuit_th", load_model)


def m_load_ksuit_safetensors(ctx: dict) -> dict:
    """`ksuit.load_model` of the `.safetensors` weights."""
    from ksuit.readers import load_model

    return _load(ctx, "ksuit_safetensors", load_model)


# ---- orchestration ----------------------------------------------------------------------------


def run_child(method: str, scale: float, folder: Path, files: dict | None) -> dict:
    """Runs one method in this (fresh) process; returns its measurements."""
    from bench_state import build_model, state_nbytes

    ctx: dict[str, Any] = {"scale": scale, "dir": folder, "files": files or {}}
    if method.startswith("load_"):
        return globals()[f"m_{method}"](ctx)
    start = time.perf_counter()
    model = build_model(scale)
    weights, optim = state_nbytes(model)
    ctx.update(model=model, state_bytes=weights + optim)
    if method == "prepare":
        return {"files": prepare_load_files(ctx), "weights_bytes": weights, "optim_bytes": optim}
    result = globals()[f"m_{method}"](ctx)
    result.update(
        state_bytes=weights + optim, weights_bytes=weights, build_seconds=time.perf_counter() - start
    )
    return result


def spawn(method: str, scale: float, folder: Path, files: dict | None = None) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        method,
        "--scale",
        str(scale),
        "--dir",
        str(folder),
        "--files",
        json.dumps(files or {}),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gbps(r: dict) -> float | None:
    return r["bytes"] / r["seconds"] / 1e9 if "seconds" in r and r.get("bytes") else None


def evaluate(results: dict, state_bytes: int) -> list[dict]:
    """The issue's targets, as ratios within this run."""

    def get(m: str, k: str) -> float | None:
        return results.get(m, {}).get(k)

    targets = []

    def target(name: str, value: float | None, goal: float, higher_is_better: bool, detail: str) -> None:
        met = value is not None and (value >= goal if higher_is_better else value <= goal)
        targets.append({"target": name, "value": value, "goal": goal, "met": met, "detail": detail})

    raw = gbps(results.get("raw_buffered", {})) if "bytes" in results.get("raw_buffered", {}) else None
    sync = (
        gbps(results.get("ksuit_sync_torch", {})) if "bytes" in results.get("ksuit_sync_torch", {}) else None
    )
    target(
        "ksuit sync save >= 0.9x buffered raw fsynced write",
        sync / raw if sync and raw else None,
        0.9,
        True,
        "bandwidth ratio",
    )
    blocked, sync_s = get("ksuit_async", "blocked"), get("ksuit_sync_torch", "seconds")
    target(
        "ksuit async blocks <= 10% of its sync save",
        blocked / sync_s if blocked and sync_s else None,
        0.10,
        False,
        "blocked seconds / sync save seconds",
    )
    dcp_blocked = get("dcp_async_save", "blocked")
    target(
        "ksuit async blocks < DCP async_save blocks",
        blocked / dcp_blocked if blocked and dcp_blocked else None,
        1.0,
        False,
        "ratio of blocked seconds (must be < 1)",
    )
    extra = get("ksuit_async", "peak_extra")
    target(
        "ksuit async peak extra memory <= 1.1x state",
        extra / state_bytes if extra is not None else None,
        1.1,
        False,
        "peak extra RSS / state bytes",
    )
    # loaders are compared on the same file: how a file was written (O_DIRECT or buffered) changes
    # how fast any loader reads it back on some disks, which is not the loader's doing
    st, kst = get("load_safetensors_of_ksuit_file", "seconds"), get("load_ksuit_safetensors", "seconds")
    target(
        "ksuit load_model(safetensors) >= 0.95x safetensors load_file (same file)",
        st / kst if st and kst else None,
        0.95,
        True,
        "speed ratio (time of safetensors / time of ksuit)",
    )
    mm, kth = get("load_torch_mmap_of_ksuit_file", "seconds"), get("load_ksuit_th", "seconds")
    target(
        "ksuit load_model(.th) >= torch.load(mmap=True) (same file)",
        mm / kth if mm and kth else None,
        1.0,
        True,
        "speed ratio (time of torch mmap / time of ksuit)",
    )
    return targets


def print_table(results: dict, targets: list[dict], meta: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    raw = gbps(results["raw_buffered"]) if "bytes" in results.get("raw_buffered", {}) else None
    table = Table(
        title=f"save/load, state {meta['state_bytes'] / GIB:.2f} GiB (weights "
        f"{meta['weights_bytes'] / GIB:.2f} GiB), scale {meta['scale']}"
    )
    for col in ("method", "seconds", "blocked s", "GB/s", "x raw disk", "peak extra GiB", "note"):
        table.add_column(col, justify="left" if col in ("method", "note") else "right")
    for method, r in results.items():
        if "error" in r:
            table.add_row(method, "-", "-", "-", "-", "-", f"failed: {r['error'][:60]}")
            continue
        bw = gbps(r)
        note = ""
        if "first_blocked" in r:
            note = f"first save: blocked {r['first_blocked']:.2f}s, total {r['first_seconds']:.2f}s"
        if "call_seconds" in r:
            note = f"load call {r['call_seconds']:.2f}s, rest: touching pages"
        if "fresh_gbps" in r:
            note = f"into fresh memory: {r['fresh_gbps']:.2f} GB/s"
        table.add_row(
            method,
            f"{r['seconds']:.2f}",
            f"{r['blocked']:.3f}" if "blocked" in r else "",
            f"{bw:.2f}" if bw else "",
            f"{bw / raw:.2f}" if bw and raw else "",
            f"{r['peak_extra'] / GIB:.2f}" if r.get("peak_extra") is not None else "",
            note,
        )
    console = Console(width=200)
    console.print(table)
    for t in targets:
        value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        console.print(
            f"[{'green' if t['met'] else 'red'}]{'MET ' if t['met'] else 'MISS'}[/] {t['target']}: "
            f"{value} (goal {t['goal']}; {t['detail']})"
        )


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
    load_wanted = [m for m in LOAD_METHODS if not wanted or m in wanted]
    prep = spawn("prepare", args.scale, root / "load") if load_wanted else {}
    # loads are short and the virtual disk's host cache favours later readers of a file: every
    # load runs LOAD_ROUNDS times, in a rotated order each round, and the median run is kept
    runs: dict[str, list[dict]] = {m: [] for m in load_wanted}
    for round_ in range(LOAD_ROUNDS):
        shift = round_ % max(1, len(load_wanted))
        for method in load_wanted[shift:] + load_wanted[:shift]:
            print(f"running {method} (round {round_ + 1}) ...", file=sys.stderr, flush=True)
            runs[method].append(spawn(method, args.scale, root / "load", prep.get("files")))
    for method, rs in runs.items():
        ok = sorted((r for r in rs if "seconds" in r), key=lambda r: r["seconds"])
        results[method] = (
            dict(ok[len(ok) // 2], rounds=[r["seconds"] for r in rs if "seconds" in r]) if ok else rs[0]
        )
    shutil.rmtree(root, ignore_errors=True)

    any_r = next((r for r in results.values() if "state_bytes" in r), {})
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
        },
        "target_dir": str(root),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "wall_seconds": round(time.time() - started, 1),
        "command": "python benchmarks/bench_save_load.py " + " ".join(sys.argv[1:]),
    }
    targets = evaluate(results, meta["state_bytes"])
    print_table(results, targets, meta)
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
