"""The save and load methods of the benchmark: raw disk writes, memcpy, ksuit's saves, torch.save,
safetensors and torch.distributed.checkpoint, and loads of one weights file by each loader.

Each `m_<name>(ctx)` runs in a fresh process (`harness.spawn`); `ctx` holds `scale`, `dir`
(its folder), `files` (what `prepare_load_files` wrote) and, for saves, the benchmark `model`
and `state_bytes`. Every save method fsyncs its files.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from pathlib import Path
from typing import Any

from harness import GIB, evict, fsync_path, peak_extra, read_once, reset_peak, touch_all, tree_bytes

CHUNK = 64 << 20
BOUNCE = 16 << 20


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
    for tag, fmt in (("E1_U0_S0", "torch"), ("E2_U0_S0", "safetensors")):  # one set each: a set
        writer = _writer(ctx, format=fmt)  # holds one format of a file (a save in another replaces it)
        writer.save(model, tag, save_optim=False)
    files = {
        "torch": d / "weights.pt",
        "safetensors": d / "weights.safetensors",
        "ksuit_th": d / "bench" / "checkpoints" / "bench_cp=E1_U0_S0_model.th",
        "ksuit_safetensors": d / "bench" / "checkpoints" / "bench_cp=E2_U0_S0_model.safetensors",
    }
    for p in files.values():
        fsync_path(p)
        read_once(p)
    return {k: str(v) for k, v in files.items()}


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
