"""Save/load to S3: ksuit against plain s3fs, on a local moto S3 endpoint (HTTP on loopback).

The state is the one of `bench_save_load.py` (`bench_state.py`: about 1 GiB of weights plus an
AdamW state twice that size, at `--scale 1`). moto runs in its own process; every method runs
in a fresh process and reports seconds, bytes and peak extra resident memory.

- save: `CheckpointWriter.save` to `s3://...` (weights and optimizer files streamed in multipart
  parts while hashed, commit record, head swap) against `s3fs.put` of a `torch.save` file of the
  same state (the file is written before the clock starts);
- load: `ksuit.load_model` of the weights (resolve through the head, download once, check the
  checksum, check the archive, load) against `s3fs.get` of the same object to a local file plus
  `torch.load(weights_only=True)`.

Target: ksuit at least 0.8x s3fs's throughput each way. Every method runs three times in
rotated order and the median counts (a shared machine's timings drift by tens of percent).

Usage: `python benchmarks/bench_s3.py --out benchmarks/results_s3.json [--scale 0.1]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

BUCKET = "ksuit-bench"
SAVE_METHODS = ["s3fs_put_torch_save_file", "ksuit_save_s3"]
LOAD_METHODS = ["s3fs_get_torch_load", "ksuit_load_model_s3"]
ROUNDS = 3  # every method, in rotated order; the median counts
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}


# ---- methods (each in a fresh process) --------------------------------------------------------


def _fs():
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"])


def m_s3fs_put_torch_save_file(ctx: dict) -> dict:
    """`s3fs.put` of a `torch.save` file of the whole state (written before timing)."""
    import torch
    from harness import peak_extra, reset_peak

    model = ctx["model"]
    local = Path(ctx["tmp"]) / "state.pt"
    torch.save({"model": model.state_dict(), "optim": model.optimizer.torch_optim.state_dict()}, local)
    fs = _fs()
    fs.ls(BUCKET)  # the session exists before the clock starts, as ksuit's does after its first call
    base = reset_peak()
    start = time.perf_counter()
    fs.put(str(local), f"{BUCKET}/s3fs/state.pt")
    seconds = time.perf_counter() - start
    result = {"seconds": seconds, "bytes": local.stat().st_size, "peak_extra": peak_extra(base)}
    fs.rm(f"{BUCKET}/s3fs", recursive=True)  # the server keeps objects in memory and temporary files
    return result


def m_ksuit_save_s3(ctx: dict) -> dict:
    """`CheckpointWriter.save` of weights and optimizer state to `s3://`, commit included."""
    from harness import peak_extra, reset_peak

    from ksuit.providers import PathProvider
    from ksuit.storage import open_backend
    from ksuit.utils.training import TrainingIteration, UpdateCounter
    from ksuit.writers import CheckpointWriter

    counter = UpdateCounter(None, TrainingIteration(epoch=10), updates_per_epoch=10, effective_batch_size=1)
    pp = PathProvider(f"s3://{BUCKET}/ksuit", "bench")
    writer = CheckpointWriter(pp, counter)
    open_backend(pp.checkpoint_path).read_head()  # the session exists before the clock starts
    base = reset_peak()
    start = time.perf_counter()
    writer.save(ctx["model"], "E1_U0_S0")
    seconds = time.perf_counter() - start
    entries = open_backend(pp.checkpoint_path).entries()
    result = {"seconds": seconds, "bytes": sum(e.size for e in entries), "peak_extra": peak_extra(base)}
    _fs().rm(f"{BUCKET}/ksuit", recursive=True)
    return result


def prepare_load_files(ctx: dict) -> dict:
    """Saves the weights once with ksuit; both loaders read that object."""
    from ksuit.providers import PathProvider
    from ksuit.storage import open_backend
    from ksuit.utils.training import TrainingIteration, UpdateCounter
    from ksuit.writers import CheckpointWriter

    counter = UpdateCounter(None, TrainingIteration(epoch=10), updates_per_epoch=10, effective_batch_size=1)
    pp = PathProvider(f"s3://{BUCKET}/load", "bench")
    with CheckpointWriter(pp, counter) as writer:
        writer.save(ctx["model"], "E1_U0_S0", save_optim=False)
    name = "bench_cp=E1_U0_S0_model.th"
    backend = open_backend(pp.checkpoint_path)
    ref = backend.view().files[name]
    return {"url": f"{pp.checkpoint_path}/{name}", "object": backend.path(ref.key), "bytes": ref.size}


def _load(ctx: dict, fn) -> dict:
    from harness import peak_extra, reset_peak, touch_all

    base = reset_peak()
    start = time.perf_counter()
    obj = fn()
    touch_all(obj)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "bytes": ctx["files"]["bytes"], "peak_extra": peak_extra(base)}


def m_s3fs_get_torch_load(ctx: dict) -> dict:
    """`s3fs.get` of the weights object to a local file, then `torch.load(weights_only=True)`."""
    import torch

    fs = _fs()
    fs.ls(BUCKET)
    local = Path(ctx["tmp"]) / "weights.th"

    def load() -> Any:
        fs.get(ctx["files"]["object"], str(local))
        return torch.load(local, weights_only=True)

    return _load(ctx, load)


def m_ksuit_load_model_s3(ctx: dict) -> dict:
    """`ksuit.load_model` of the weights URL: resolved, downloaded once, checked, loaded."""
    import ksuit
    from ksuit.storage import split_file_location

    folder, _ = split_file_location(ctx["files"]["url"])
    folder.read_head()  # the session exists before the clock starts
    return _load(ctx, lambda: ksuit.load_model(ctx["files"]["url"]))


# ---- orchestration ----------------------------------------------------------------------------


def run_child(method: str, scale: float, files: dict) -> dict:
    from bench_state import build_model, state_nbytes

    with tempfile.TemporaryDirectory(prefix="ksuit-bench-s3-") as tmp:
        ctx: dict[str, Any] = {"scale": scale, "files": files, "tmp": tmp}
        if method.startswith(("s3fs_get", "ksuit_load")):
            return globals()[f"m_{method}"](ctx)
        model = build_model(scale)
        weights, optim = state_nbytes(model)
        ctx.update(model=model)
        if method == "prepare":
            return {"files": prepare_load_files(ctx), "weights_bytes": weights, "optim_bytes": optim}
        result = globals()[f"m_{method}"](ctx)
        result.update(state_bytes=weights + optim)
        return result


def spawn(method: str, scale: float, env: dict[str, str], files: dict | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", method, "--scale", str(scale)]
    cmd += ["--files", json.dumps(files or {})]
    path = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**env, "PYTHONPATH": path})
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    import boto3

    client = boto3.client("s3", endpoint_url=url, aws_access_key_id="bench", aws_secret_access_key="bench")
    deadline = time.monotonic() + 60
    while True:
        try:
            client.create_bucket(Bucket=BUCKET)
            return server, url
        except Exception:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise
            time.sleep(0.2)


def gbps(r: dict) -> float | None:
    return r["bytes"] / r["seconds"] / 1e9 if r.get("seconds") and r.get("bytes") else None


def evaluate(results: dict) -> list[dict]:
    targets = []
    for name, ours, theirs in (
        ("save: ksuit / s3fs put", "ksuit_save_s3", "s3fs_put_torch_save_file"),
        ("load: ksuit / s3fs get + torch.load", "ksuit_load_model_s3", "s3fs_get_torch_load"),
    ):
        a, b = gbps(results.get(ours, {})), gbps(results.get(theirs, {}))
        ratio = a / b if a and b else None
        targets.append(
            {"target": name, "value": ratio, "goal": 0.8, "met": ratio is not None and ratio >= 0.8}
        )
    return targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "results_s3.json", help="JSON results file")
    parser.add_argument("--scale", type=float, default=1.0, help="state size factor (1.0: ~1 GiB weights)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--files", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, args.scale, json.loads(args.files))))
        return

    started = time.time()
    server, url = start_moto()
    env = {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": url, "AWS_EC2_METADATA_DISABLED": "true"}
    results: dict[str, dict] = {}
    try:
        runs: dict[str, list[dict]] = {m: [] for m in SAVE_METHODS + LOAD_METHODS}
        prep: dict[str, Any] = {}
        for methods in (SAVE_METHODS, LOAD_METHODS):
            if methods is LOAD_METHODS:
                prep = spawn("prepare", args.scale, env)
            for round_ in range(ROUNDS):
                for method in methods[round_ % 2 :] + methods[: round_ % 2]:
                    print(f"running {method} (round {round_ + 1}) ...", file=sys.stderr, flush=True)
                    runs[method].append(spawn(method, args.scale, env, prep.get("files")))
        for method, rs in runs.items():
            ok = sorted((r for r in rs if "seconds" in r), key=lambda r: r["seconds"])
            results[method] = dict(ok[len(ok) // 2], rounds=[r["seconds"] for r in ok]) if ok else rs[0]
    finally:
        server.kill()
        server.wait()
    for r in results.values():
        if gbps(r):
            r["gbps"] = gbps(r)
    targets = evaluate(results)
    print(f"{'method':<28} {'seconds':>8} {'GB/s':>7} {'peak extra MiB':>15}")
    for method, r in results.items():
        if "error" in r:
            print(f"{method:<28} error: {r['error']}")
            continue
        print(f"{method:<28} {r['seconds']:8.2f} {r['gbps']:7.3f} {r['peak_extra'] / (1 << 20):15.0f}")
    for t in targets:
        value = "n/a" if t["value"] is None else f"{t['value']:.2f}x"
        print(f"{t['target']}: {value} (target >= {t['goal']}x) {'MET' if t['met'] else 'NOT MET'}")
    meta = {
        "scale": args.scale,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "wall_seconds": round(time.time() - started, 1),
        "command": "python benchmarks/bench_s3.py " + " ".join(sys.argv[1:]),
    }
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "results": results, "targets": targets}, indent=1))


if __name__ == "__main__":
    main()
