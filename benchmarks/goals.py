"""The methods behind the goals of issue 14 (each a ratio of two things measured in one process,
in rotated rounds, unless said otherwise):

1. steady async stall against a parallel `copy_` of the same bytes into touched memory, for the
   benchmark state (`m_ksuit_async`) and for 5,000 tensors of 64 KiB (`m_ksuit_async_small`);
2. the first async save's stall (snapshot memory prepared at set-up, as the trainer does)
   against a steady one (`m_ksuit_async`; `m_ksuit_async_unprepared` shows a first save
   without `prepare`);
3. resume (choose the set, verify it, load weights, optimizer and trainer state into the model)
   against `torch.load(mmap=True)` of the same files with every page touched, cold cache
   (`m_resume_ksuit` and `m_resume_torch_mmap`, fresh processes in rotated rounds);
4. the trainer's `latest` of a composite of 20 submodels (41 small files) against the same
   payloads in one file through the same set writer (`m_many_files`).

Before each timed save or copy the previous asynchronous save is flushed, so no measurement
shares the machine with a background write.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from harness import evict, median, peak_extra, read_once, reset_peak, rotated, touch_all, tree_bytes
from methods import _writer

ASYNC_ROUNDS = 3  # each round writes the state once (3 GiB at scale 1)
SMALL_ROUNDS = 7
FILES_ROUNDS = 15


class _TrainerStub:
    """What `CheckpointWriter.save` and `ResumeInitializer.apply` use of a trainer."""

    rank = 0

    def __init__(self, model: Any = None, counter: Any = None):
        from bench_state import trainer_state

        self.model, self.update_counter, self.resumed_from = model, counter, None
        self._state = trainer_state()
        self.loaded: Any = None

    def state_dict(self) -> dict:
        return self._state

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        self.loaded = state


def _stall_rounds(writer: Any, model: Any, nbytes: int, rounds: int, tag: int) -> dict[str, list[float]]:
    """Steady saves against a parallel copy of `nbytes` into touched memory, rotated."""
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    dst.copy_(src)
    tags = iter(range(tag + 1, tag + 1 + rounds))

    def save() -> None:
        writer.save(model, f"E{next(tags)}_U0_S0")

    seconds: dict[str, list[float]] = {"save": [], "copy": []}
    for r in range(rounds):
        for name in ("save", "copy") if r % 2 == 0 else ("copy", "save"):
            writer.flush()  # no background write during a measurement
            start = time.perf_counter()
            save() if name == "save" else dst.copy_(src)
            seconds[name].append(time.perf_counter() - start)
    writer.flush()
    return seconds


def _async(ctx: dict, model: Any, nbytes: int, rounds: int, prepare: bool) -> dict:
    writer = _writer(ctx, async_save=True)
    base = reset_peak()
    start = time.perf_counter()
    prepare_seconds = None
    if prepare:  # the trainer calls it at set-up; training runs meanwhile
        writer.prepare(model)
        writer.snapshot_pool.wait_prepared()
        prepare_seconds = time.perf_counter() - start
    start = time.perf_counter()
    writer.save(model, "E1_U0_S0")
    first_blocked = time.perf_counter() - start
    writer.flush()
    first_seconds = time.perf_counter() - start
    start = time.perf_counter()
    writer.save(model, "E2_U0_S0")
    blocked = time.perf_counter() - start
    writer.flush()
    seconds = time.perf_counter() - start
    extra = peak_extra(base)  # before the copy baseline's own buffers
    result = {
        "seconds": seconds,
        "first_blocked": first_blocked,
        "first_seconds": first_seconds,
        "prepare_seconds": prepare_seconds,
        "bytes": tree_bytes(ctx["dir"]) // 2,
        "peak_extra": extra,
    }
    if rounds:
        rs = _stall_rounds(writer, model, nbytes, rounds, tag=2)
        stalls = [blocked, *rs["save"]]
        result.update(
            blocked=median(stalls),
            copy_seconds=median(rs["copy"]),
            stall_rounds=stalls,
            copy_rounds=rs["copy"],
        )
    else:
        result["blocked"] = blocked
    writer.close()
    return result


def m_ksuit_async(ctx: dict) -> dict:
    """`CheckpointWriter(async_save=True)` with `prepare(model)` first (as the trainer's set-up):
    the first save, then steady saves against a parallel copy of the same bytes (`blocked` and
    `copy_seconds` are medians); `seconds` is one steady save until `flush()` returned."""
    return _async(ctx, ctx["model"], ctx["state_bytes"], ASYNC_ROUNDS, prepare=True)


def m_ksuit_async_unprepared(ctx: dict) -> dict:
    """The same without `prepare`: the first save maps and faults in its memory itself."""
    return _async(ctx, ctx["model"], ctx["state_bytes"], 0, prepare=False)


def m_ksuit_async_small(ctx: dict) -> dict:
    """Goal 1 for a state of many small tensors: 5,000 of 64 KiB, weights only."""
    from bench_state import build_many_small

    model = build_many_small()
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    result = _async(ctx, model, nbytes, SMALL_ROUNDS, prepare=True)
    result["state_bytes"] = nbytes
    return result


# ---- resume ---------------------------------------------------------------------------------------


def prepare_resume_files(ctx: dict) -> dict:
    """A resumable `latest` set of the benchmark state (weights, AdamW state, trainer state)."""
    writer = _writer(ctx)
    writer.save(ctx["model"], "latest", trainer=_TrainerStub())
    folder = Path(ctx["dir"]) / "bench" / "checkpoints"
    for p in folder.iterdir():
        read_once(p)
    return {"resume_dir": str(folder.parent)}


def _empty_model(scale: float) -> Any:
    """The benchmark model as a trainer has it before a resume: weights initialized (here zeroed:
    the memory is touched, as any initialization touches it), no optimizer state yet."""
    import torch
    from bench_state import BenchNet, BenchNetConfig

    config = BenchNetConfig(scale=scale, optimizer_config={"kind": "torch.optim.AdamW", "lr": 1e-3})
    model = BenchNet(config).initialize()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def _resume_files(ctx: dict) -> list[Path]:
    folder = Path(ctx["files"]["resume_dir"]) / "checkpoints"
    return sorted(p for p in folder.iterdir() if p.name.endswith(".th"))


def m_resume_ksuit(ctx: dict) -> dict:
    """`ResumeInitializer.apply`: choose the set, verify every file against its manifest, load
    weights, optimizer and trainer state into the model; then every page of the model's and the
    optimizer's tensors is touched (the optimizer's state stays memory-mapped until then)."""
    from ksuit.initializers import ResumeInitializer
    from ksuit.utils.training import TrainingIteration, UpdateCounter

    model = _empty_model(ctx["scale"])
    counter = UpdateCounter(None, TrainingIteration(epoch=10), updates_per_epoch=10, effective_batch_size=1)
    trainer = _TrainerStub(model, counter)
    files = _resume_files(ctx)
    for p in files:
        evict(p)
    base = reset_peak()
    start = time.perf_counter()
    ResumeInitializer(ctx["files"]["resume_dir"]).apply(trainer)
    call = time.perf_counter() - start
    touch_all(model.state_dict())
    touch_all(model.optimizer.state_dict())
    touch_all(trainer.loaded)
    seconds = time.perf_counter() - start
    nbytes = sum(p.stat().st_size for p in files)
    return {"seconds": seconds, "call_seconds": call, "bytes": nbytes, "peak_extra": peak_extra(base)}


def m_resume_torch_mmap(ctx: dict) -> dict:
    """`torch.load(mmap=True, weights_only=True)` of the same files, every page touched."""
    import torch

    files = _resume_files(ctx)
    for p in files:
        evict(p)
    base = reset_peak()
    start = time.perf_counter()
    loaded = [torch.load(p, mmap=True, weights_only=True) for p in files]
    call = time.perf_counter() - start
    touch_all(loaded)
    seconds = time.perf_counter() - start
    nbytes = sum(p.stat().st_size for p in files)
    return {"seconds": seconds, "call_seconds": call, "bytes": nbytes, "peak_extra": peak_extra(base)}


# ---- many small files ------------------------------------------------------------------------------


def m_many_files(ctx: dict) -> dict:
    """The `latest` of a composite of 20 submodels with trainer state (41 files), against the
    same payloads as one file through the same set writer (manifest, journal, switch)."""
    from bench_state import build_many_leaves, trainer_state

    from ksuit.storage import PendingFile, SetWriter, open_backend

    model = build_many_leaves()
    writer = _writer(ctx)
    trainer = _TrainerStub()
    one = open_backend(Path(ctx["dir"]) / "one")
    one.ensure_folder()
    bundle_writer = SetWriter(one)

    def many() -> None:
        writer.save(model, "latest", trainer=trainer)

    def bundle() -> None:
        payload: dict[str, Any] = {"trainer": trainer_state()}
        for name, leaf in model.iter_leaves():
            payload[f"{name}.model"] = {"state_dict": leaf.state_dict()}
            payload[f"{name}.optim"] = leaf.optimizer.state_dict()
        bundle_writer.write(
            [
                PendingFile(
                    "bundle_cp=latest_model.th", payload, "torch", "model", "bundle", "latest", {"epoch": 1}
                )
            ]
        )

    many()
    bundle()  # both folders hold a previous `latest`: every save replaces files, as in training
    rs = rotated({"files": many, "one": bundle}, FILES_ROUNDS)
    folder = Path(ctx["dir"]) / "bench" / "checkpoints"
    n_files = len([p for p in folder.iterdir() if p.name.endswith(".th")])
    return {
        "seconds": median(rs["files"]),
        "one_file_seconds": median(rs["one"]),
        "files": n_files,
        "bytes": sum(p.stat().st_size for p in folder.iterdir() if p.name.endswith(".th")),
        "one_file_bytes": tree_bytes(Path(ctx["dir"]) / "one"),
        "rounds": rs["files"],
        "one_file_rounds": rs["one"],
        "peak_extra": None,
    }
