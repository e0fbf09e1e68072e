"""A saver to be SIGKILLed while it writes to S3, for `test_s3_kill.py`.

`python s3_kill_worker.py RUN_ROOT` (an `s3://` URL; the endpoint and credentials come from the
AWS variables) starts a *zygote* that imports torch, ksuit and s3fs once, then forks one worker
per `spawn <seed>` line read from stdin (no event loop or client exists before the fork).

A worker resumes the way a real run does (`select_resume_set`, then weights, optimizer and
trainer state), then trains and saves forever: every update writes `latest` (weights,
optimizers, trainer) and, every third update, a progress tag too, in one save. The encoder's
optimizer state takes two multipart parts of 5 MiB, so kills land in part uploads too. With an
odd seed the commit record and head writes take a few ms longer (a sleep before and after
each), so kills also land between the data and the commit record and around the head swap.

Lines on stdout: `zygote-ready`, `pid <pid>`, `saving <pid> <resumed update or -1>`,
`exit <pid> <status>`, `error <pid> <what>`.
"""

from __future__ import annotations

import os
import sys
import time

import torch

torch.set_num_threads(1)

import aiobotocore.session  # noqa: E402
import s3fs  # noqa: E402
from fsspec.asyn import sync  # noqa: E402

from ksuit.providers import PathProvider  # noqa: E402
from ksuit.readers import select_resume_set  # noqa: E402
from ksuit.storage import load_file  # noqa: E402
from ksuit.storage.objectstore.s3 import S3Store  # noqa: E402
from ksuit.utils.training import TrainingIteration, UpdateCounter  # noqa: E402
from ksuit.writers.checkpoint_writer import CheckpointWriter  # noqa: E402
from ksuit.zoo.autoencoder import Autoencoder, AutoencoderConfig, DecoderConfig, EncoderConfig  # noqa: E402

GROUP = "autoencoder"
RUN_ID = "run"
ADAMW = {"kind": "torch.optim.AdamW", "lr": 1e-3}
HIDDEN = 33_000  # encoder weights 2.6 MiB (one PUT), its AdamW state 5.3 MiB (two parts)
# one botocore session for every worker: its service models are parsed once, in the zygote
SESSION = aiobotocore.session.AioSession()
STORAGE = {"ksuit_part_size": 5 << 20, "ksuit_concurrency": 2, "session": SESSION}


def emit(line: str) -> None:
    os.write(1, (line + "\n").encode())


def make_model() -> Autoencoder:
    config = AutoencoderConfig(
        encoder=EncoderConfig(input_dim=16, hidden_dim=HIDDEN, latent_dim=4, optimizer_config=ADAMW),
        decoder=DecoderConfig(latent_dim=4, hidden_dim=16, output_dim=16, optimizer_config=ADAMW),
    )
    return Autoencoder(config).initialize()


class Trainer:
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


def slow_commits(delay: float = 0.02) -> None:
    """Every write of a commit record or of the head waits `delay` before and after it."""
    real_put = S3Store.put

    def put(self, path, data, **kwargs):
        slow = "/.ksuit/commits/" in path or path.endswith("/.ksuit/HEAD.json")
        if slow:
            time.sleep(delay)
        result = real_put(self, path, data, **kwargs)
        if slow:
            time.sleep(delay)
        return result

    S3Store.put = put


def work(run_root: str, seed: int) -> None:
    torch.manual_seed(seed)
    if seed % 2:
        slow_commits()
    provider = PathProvider(run_root, RUN_ID, storage_options=STORAGE)
    counter = UpdateCounter(None, TrainingIteration(update=10**9), 10, 4)
    model = make_model()
    trainer = Trainer(counter)
    writer = CheckpointWriter(provider, counter)  # registers the storage options for the run
    writer._set_sink()
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
    emit(f"saving {os.getpid()} {resumed}")
    for _ in range(1_000_000):
        x = torch.randn(4, 16)
        ((model(x) - x) ** 2).mean().backward()
        for _name, leaf in model.iter_leaves():
            leaf.optimizer.step()
            leaf.optimizer.zero_grad()
        counter.next_update()
        counter.add_samples(4)
        if counter.at_epoch_end:
            counter.next_epoch()
        progress = counter.update % 3 == 0
        writer.save(
            model,
            str(counter.cur_iteration) if progress else "latest",
            trainer=trainer,
            save_weights=progress,
            save_optim=progress,
            save_latest_weights=True,
            save_latest_optim=True,
        )


def warm_up() -> None:
    """Runs the lazily imported paths of torch and botocore once before forking (the client made
    here is not used after: fsspec gives a forked child its own event loop and clients)."""
    import io

    fs = s3fs.S3FileSystem(session=SESSION, skip_instance_cache=True)
    sync(fs.loop, fs.set_session)

    model = make_model()
    x = torch.randn(4, 16)
    ((model(x) - x) ** 2).mean().backward()
    for _name, leaf in model.iter_leaves():
        leaf.optimizer.step()
        buf = io.BytesIO()
        torch.save({"optim": leaf.optimizer.state_dict()}, buf)
        buf.seek(0)
        torch.load(buf, weights_only=True)


def zygote(run_root: str) -> None:
    warm_up()
    emit("zygote-ready")
    while True:
        parts = sys.stdin.readline().split()
        if not parts or parts[0] == "quit":
            return
        pid = os.fork()
        if pid == 0:
            status = 0
            try:
                work(run_root, int(parts[1]))
            except BaseException as e:  # reported to the parent, which fails the test
                emit(f"error {os.getpid()} {type(e).__name__}: {e}".replace("\n", " "))
                status = 1
            os._exit(status)
        emit(f"pid {pid}")
        _, status = os.waitpid(pid, 0)
        emit(f"exit {pid} {status}")


if __name__ == "__main__":
    zygote(sys.argv[1])
