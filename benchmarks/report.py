"""The benchmark's targets (one table: name, how its ratio is computed, goal, direction) and the
printed report. Every target is a ratio of two numbers measured in the same run; it is MET, a
MISS, or NOT MEASURED when a number is missing (a method failed, or needs hardware this machine
lacks)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from harness import GIB

Results = dict[str, dict[str, Any]]


def gbps(r: dict) -> float | None:
    return r["bytes"] / r["seconds"] / 1e9 if "seconds" in r and r.get("bytes") else None


def _get(results: Results, method: str, key: str) -> float | None:
    value = results.get(method, {}).get(key)
    return value if isinstance(value, (int, float)) else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _of(a: str, a_key: str, b: str, b_key: str) -> Callable[[Results, int], float | None]:
    """The ratio `results[a][a_key] / results[b][b_key]`."""
    return lambda r, _: _ratio(_get(r, a, a_key), _get(r, b, b_key))


class Target(NamedTuple):
    name: str
    value: Callable[[Results, int], float | None]  # (results, state bytes) -> ratio
    goal: float
    higher_is_better: bool
    detail: str


def _bw(results: Results, method: str) -> float | None:
    return gbps(results[method]) if "bytes" in results.get(method, {}) else None


TARGETS = [
    Target(
        "ksuit sync save >= 0.9x buffered raw fsynced write",
        lambda r, _: _ratio(_bw(r, "ksuit_sync_torch"), _bw(r, "raw_buffered")),
        0.9,
        True,
        "bandwidth ratio",
    ),
    Target(
        "ksuit async blocks <= 10% of its sync save",
        _of("ksuit_async", "blocked", "ksuit_sync_torch", "seconds"),
        0.10,
        False,
        "blocked seconds / sync save seconds",
    ),
    Target(
        "ksuit async blocks < DCP async_save blocks",
        _of("ksuit_async", "blocked", "dcp_async_save", "blocked"),
        1.0,
        False,
        "ratio of blocked seconds (must be < 1)",
    ),
    Target(
        "ksuit async peak extra memory <= 1.1x state",
        lambda r, state: _ratio(_get(r, "ksuit_async", "peak_extra"), state),
        1.1,
        False,
        "peak extra RSS / state bytes",
    ),
    # loaders are compared on the same file: how a file was written (O_DIRECT or buffered) changes
    # how fast any loader reads it back on some disks, which is not the loader's doing
    Target(
        "ksuit load_model(safetensors) >= 0.95x safetensors load_file (same file)",
        _of("load_safetensors_of_ksuit_file", "seconds", "load_ksuit_safetensors", "seconds"),
        0.95,
        True,
        "speed ratio (time of safetensors / time of ksuit)",
    ),
    Target(
        "ksuit load_model(.th) >= torch.load(mmap=True) (same file)",
        _of("load_torch_mmap_of_ksuit_file", "seconds", "load_ksuit_th", "seconds"),
        1.0,
        True,
        "speed ratio (time of torch mmap / time of ksuit)",
    ),
    # ---- issue 14 ----
    Target(
        "goal 1: steady async stall <= 1.2x parallel copy_ of the same bytes (benchmark state)",
        _of("ksuit_async", "blocked", "ksuit_async", "copy_seconds"),
        1.2,
        False,
        "median stall / median copy, rotated rounds",
    ),
    Target(
        "goal 1: steady async stall <= 1.2x parallel copy_ of the same bytes (5,000 x 64 KiB)",
        _of("ksuit_async_small", "blocked", "ksuit_async_small", "copy_seconds"),
        1.2,
        False,
        "median stall / median copy, rotated rounds",
    ),
    Target(
        "goal 2: first async save stall <= 1.5x a steady one (memory prepared at set-up)",
        _of("ksuit_async", "first_blocked", "ksuit_async", "blocked"),
        1.5,
        False,
        "first save's stall / median steady stall",
    ),
    Target(
        "goal 3: resume (select + verify + load into the model) <= 1.15x torch.load(mmap=True), cold",
        _of("resume_ksuit", "seconds", "resume_torch_mmap", "seconds"),
        1.15,
        False,
        "median seconds, every page touched, fresh processes in rotated rounds",
    ),
    Target(
        "goal 4: latest of 20 submodels (41 files) <= 2x the same bytes in one file",
        _of("many_files", "seconds", "many_files", "one_file_seconds"),
        2.0,
        False,
        "median seconds, rotated rounds, same set writer",
    ),
    Target(
        "goal 5: CUDA snapshot stall <= 1.2x pinned device-to-host copy",
        _of("ksuit_async_cuda", "blocked", "ksuit_async_cuda", "copy_seconds"),
        1.2,
        False,
        "not measured here: this machine has no GPU",
    ),
]


def evaluate(results: Results, state_bytes: int) -> list[dict]:
    """Each target's ratio in this run and whether it is met (None: not measured)."""
    out = []
    for t in TARGETS:
        value = t.value(results, state_bytes)
        met = None if value is None else (value >= t.goal if t.higher_is_better else value <= t.goal)
        out.append({"target": t.name, "value": value, "goal": t.goal, "met": met, "detail": t.detail})
    return out


def verdict(met: bool | None) -> str:
    return "NOT MEASURED" if met is None else "MET" if met else "MISS"


def _note(r: dict) -> str:
    if "copy_seconds" in r:
        return f"parallel copy {r['copy_seconds']:.3f}s; first save blocked {r['first_blocked']:.3f}s" + (
            f" (prepared in {r['prepare_seconds']:.2f}s)" if r.get("prepare_seconds") else ""
        )
    if "first_blocked" in r:
        return f"first save: blocked {r['first_blocked']:.2f}s, total {r['first_seconds']:.2f}s"
    if "one_file_seconds" in r:
        return f"{r['files']} files; same bytes in one file {r['one_file_seconds']:.3f}s"
    if "call_seconds" in r:
        return f"load call {r['call_seconds']:.2f}s, rest: touching pages"
    if "fresh_gbps" in r:
        return f"into fresh memory: {r['fresh_gbps']:.2f} GB/s"
    return ""


def print_report(results: Results, targets: list[dict], meta: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    raw = _bw(results, "raw_buffered")
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
        table.add_row(
            method,
            f"{r['seconds']:.3f}",
            f"{r['blocked']:.3f}" if "blocked" in r else "",
            f"{bw:.2f}" if bw else "",
            f"{bw / raw:.2f}" if bw and raw else "",
            f"{r['peak_extra'] / GIB:.2f}" if r.get("peak_extra") is not None else "",
            _note(r),
        )
    console = Console(width=200)
    console.print(table)
    colors = {"MET": "green", "MISS": "red", "NOT MEASURED": "yellow"}
    for t in targets:
        word = verdict(t["met"])
        value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        console.print(f"[{colors[word]}]{word}[/] {t['target']}: {value} (goal {t['goal']}; {t['detail']})")
