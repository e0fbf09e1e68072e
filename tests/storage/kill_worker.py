"""A saver to be SIGKILLed, for `test_kill.py`.

`python kill_worker.py RUN_ROOT` starts a *zygote*: it imports torch and ksuit once (seconds on
a loaded machine), then forks one worker per `spawn <mode> <seed>` line read from stdin, so
each restart after a kill costs milliseconds instead of a fresh interpreter. Forking is safe
here: the zygote never runs a parallel torch op before forking (one intra-op thread).

A worker resumes the way a real run does (`select_resume_set`, load weights, optimizer and
trainer state with `load_file`), then trains and saves forever: every update writes a progress
tag and `latest` (weights, optimizers, trainer) in one `CheckpointWriter.save`. Modes: `sync`,
`async`; `retention` (sync, `keep_last: 2, keep_every_updates: 5`: every save deletes a set
after it committed) and `budget` (sync, `max_bytes` only: once the folder is full every save
evicts the oldest set before it is written; the very first save goes without the budget, whose
estimate of files never written before is generous); in these two, half of the workers make every
unlink a few ms slower, so kills land inside set deletes too.

A mode `<sync|async>@<phase>` makes the worker stop at one point of its third save and say so,
so the parent's kill lands exactly there: `staged` (temp files written and fsynced, no journal
yet) or `committed` (the journal landed, no rename applied).

Lines on stdout (one `os.write` each, so they never interleave):
`zygote-ready`, `pid <pid>`, `saving <pid> <resumed update or -1>`, `paused <pid> <phase>`,
`exit <pid> <status>`.
"""

from __future__ import annotations

import os
import sys

import torch

torch.set_num_threads(1)

from ksuit.providers import PathProvider  # noqa: E402
from ksuit.readers import select_resume_set  # noqa: E402
from ksuit.retention import RetentionPolicy  # noqa: E402
from ksuit.storage import load_file  # noqa: E402
from ksuit.utils.training import TrainingIteration, UpdateCounter  # noqa: E402
from ksuit.writers.checkpoint_writer import CheckpointWriter  # noqa: E402
from ksuit.zoo.autoencoder import Autoencoder, AutoencoderConfig, DecoderConfig, EncoderConfig  # noqa: E402

GROUP = "autoencoder"
RUN_ID = "run"
ADAMW = {"kind": "torch.optim.AdamW", "lr": 1e-3}
UPDATES_PER_EPOCH = 10
BATCH = 4
POLICIES = {
    "retention": RetentionPolicy(keep_last=2, keep_every_updates=5),
    "budget": RetentionPolicy(max_bytes="300KiB"),  # latest and about four progress sets
}


def emit(line: str) -> None:
    os.write(1, (line + "\n").encode())


def make_model() -> Autoencoder:
    config = AutoencoderConfig(
        encoder=EncoderConfig(input_dim=16, hidden_dim=64, latent_dim=4, optimizer_config=ADAMW),
        decoder=DecoderConfig(latent_dim=4, hidden_dim=64, output_dim=16, optimizer_config=ADAMW),
    )
    return Autoencoder(config).initialize()


class Trainer:
    """A trainer-like object: its state is what resume needs besides weights and optimizers."""

    def __init__(self, counter: UpdateCounter):
        self.counter = counter

    def state_dict(self) -> dict:
        return {
            "training_iteration": dict(self.counter.cur_iteration),
            "update_counter": self.counter.state_dict(),
            "rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.counter.load_state_dict(state["update_counter"])
        torch.set_rng_state(state["rng"])


def slow_metadata_disk(delay: float = 0.003) -> None:
    """Makes every rename and folder fsync of this process take a few ms longer, like a busy
    network file system, so random kills also land between the renames of a set switch (on a
    fast local disk the switch is a small fraction of a save). Behaviour is otherwise unchanged."""
    import time

    import ksuit.storage.local.files as files
    import ksuit.storage.local.recovery as recovery
    import ksuit.storage.local.staging as staging

    real_replace, real_fsync_dir = os.replace, files.fsync_dir

    def replace(src, dst):
        real_replace(src, dst)
        time.sleep(delay)

    def fsync_dir(path):
        time.sleep(delay)
        real_fsync_dir(path)

    os.replace = replace
    files.fsync_dir = staging.fsync_dir = recovery.fsync_dir = fsync_dir


def pause_at(phase: str, on_save: int = 3) -> None:
    """Blocks this worker forever at `phase` of its `on_save`-th save (after saying so)."""
    import threading

    import ksuit.storage.local.staging as staging

    target = "write_file_atomic" if phase == "staged" else "_switch"
    real = getattr(staging, target)
    seen = [0]

    def stop_then(*args, **kwargs):
        seen[0] += 1
        if seen[0] == on_save:
            emit(f"paused {os.getpid()} {phase}")
            threading.Event().wait()
        return real(*args, **kwargs)

    setattr(staging, target, stop_then)


def slow_unlinks(delay: float = 0.004) -> None:
    """Every unlink of this process takes a few ms longer (deletes of sets last longer)."""
    import time

    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):
        real_unlink(path, *args, **kwargs)
        time.sleep(delay)

    os.unlink = unlink


def work(run_root: str, mode: str, seed: int) -> None:
    mode, _, phase = mode.partition("@")
    if phase:
        pause_at(phase)
    torch.manual_seed(seed)
    if seed % 2 == 0:
        slow_metadata_disk()
    elif mode in POLICIES:
        slow_unlinks()
    provider = PathProvider(run_root, RUN_ID)
    counter = UpdateCounter(None, TrainingIteration(update=10**9), UPDATES_PER_EPOCH, BATCH)
    model = make_model()
    trainer = Trainer(counter)
    resumed = -1
    try:
        chosen, _skipped = select_resume_set(provider.run_output_path, GROUP)
    except FileNotFoundError:
        chosen = None
    if chosen is not None:
        for name, leaf in model.iter_leaves():
            leaf.load_state_dict(load_file(chosen.file(name, "model").path)["state_dict"])
            leaf.optimizer.load_state_dict(load_file(chosen.file(name, "optim").path))
        trainer.load_state_dict(load_file(chosen.file(GROUP, "trainer").path))
        resumed = counter.update
    policy = POLICIES.get(mode) if chosen is not None or mode != "budget" else None
    writer = CheckpointWriter(provider, counter, async_save=(mode == "async"), retention=policy)
    emit(f"saving {os.getpid()} {resumed}")
    for _ in range(1_000_000):
        x = torch.randn(BATCH, 16)
        ((model(x) - x) ** 2).mean().backward()
        for _name, leaf in model.iter_leaves():
            leaf.optimizer.step()
            leaf.optimizer.zero_grad()
        counter.next_update()
        counter.add_samples(BATCH)
        if counter.at_epoch_end:
            counter.next_epoch()
        writer.save(
            model,
            str(counter.cur_iteration),
            trainer=trainer,
            save_latest_weights=True,
            save_latest_optim=True,
        )
        if writer.retention is None and mode in POLICIES:
            writer = CheckpointWriter(provider, counter, retention=POLICIES[mode])


def warm_up() -> None:
    """Runs every lazily imported path once (optimizer step, save, load) before forking, so a
    worker starts saving within milliseconds."""
    import io

    model = make_model()
    x = torch.randn(BATCH, 16)
    ((model(x) - x) ** 2).mean().backward()
    for _name, leaf in model.iter_leaves():
        leaf.optimizer.step()
        buf = io.BytesIO()
        torch.save({"optim": leaf.optimizer.state_dict(), "model": leaf.state_dict()}, buf)
        buf.seek(0)
        torch.load(buf, weights_only=True)


def zygote(run_root: str) -> None:
    warm_up()
    emit("zygote-ready")
    while True:
        parts = sys.stdin.readline().split()
        if not parts or parts[0] == "quit":
            return
        _, mode, seed = parts
        pid = os.fork()
        if pid == 0:
            status = 0
            try:
                work(run_root, mode, int(seed))
            except BaseException as e:  # reported to the parent, which fails the test
                emit(f"error {os.getpid()} {type(e).__name__}: {e}".replace("\n", " "))
                status = 1
            os._exit(status)
        emit(f"pid {pid}")
        _, status = os.waitpid(pid, 0)
        emit(f"exit {pid} {status}")


if __name__ == "__main__":
    zygote(sys.argv[1])
