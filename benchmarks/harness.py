"""The benchmark's harness: memory marks from /proc, cold-cache files, touching what a load
returned, rotated rounds, and running one method in a fresh process.

A method is a function `m_<name>(ctx) -> dict` of `methods.py` or `goals.py`; `spawn` runs it in
a new interpreter (`bench_save_load.py --child <name>`) and returns its JSON line. Methods that
compare two things measure both in one process, in rounds whose order rotates (`rotated`): the
machine is shared, absolute times drift, and ratios within one run are what count.
"""

from __future__ import annotations

import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
GIB = 1 << 30


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


def read_once(path: Path) -> None:
    """Reads a file through once. On a virtual disk the host caches what was read before: the
    first reader of a freshly written file is slower whatever it is (measured: 0.84 s first vs
    0.36-0.46 s after, for either loader). Reading every file once puts all loaders on an equal
    footing; each load still starts with the file dropped from this machine's page cache."""
    with open(path, "rb", buffering=0) as f:
        while f.read(16 << 20):
            pass


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def touch_all(obj: Any) -> float:
    """Reads one element per 4 KiB page of every tensor (faults in lazily mapped data)."""
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


def rotated(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each function over `rounds` rounds; each round starts one later in the order."""
    names = list(fns)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            fns[name]()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def median(values: list[float]) -> float:
    return statistics.median(values)


def spawn(method: str, scale: float, folder: Path, files: dict | None = None) -> dict:
    """Runs `method` in a fresh interpreter; its result, or `{"error": last line of stderr}`."""
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        str(HERE / "bench_save_load.py"),
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
