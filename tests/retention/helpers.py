"""A small run saving through `CheckpointWriter` with a retention policy, for the retention tests."""

from __future__ import annotations

import os
from pathlib import Path

from ksuit.providers import PathProvider
from ksuit.readers import scan_sets, select_resume_set
from ksuit.retention import RetentionPolicy
from ksuit.utils.training import TrainingIteration, UpdateCounter
from ksuit.writers.checkpoint_writer import CheckpointWriter
from ksuit.zoo.autoencoder import Autoencoder
from tests.conftest import FakeTrainer, autoencoder_config, train_one_step

GROUP = "autoencoder"


class Saver:
    """One update per `save()`, saved under its progress tag (and `latest` with `latest=True`)."""

    def __init__(
        self,
        root: Path,
        policy: RetentionPolicy | None = None,
        async_save: bool = False,
        train: bool = True,
        model: Autoencoder | None = None,
        **kw,
    ):
        self.provider = PathProvider(root, "run")
        self.folder = self.provider.checkpoint_path
        self.run_dir = self.provider.run_output_path
        self.counter = UpdateCounter(
            None, TrainingIteration(epoch=10**6), updates_per_epoch=2, effective_batch_size=4
        )
        self.model = model if model is not None else Autoencoder(autoencoder_config()).initialize()
        self.writer = CheckpointWriter(
            self.provider, self.counter, retention=policy, async_save=async_save, **kw
        )
        self.train = train  # False: one optimizer step at the start only (the files are what matter)
        if not train and model is None:
            train_one_step(self.model)

    def restart(self, policy: RetentionPolicy | None = None, async_save: bool = False) -> None:
        """A new writer (as in a new process) with `policy`, continuing at the same update."""
        self.writer.close()
        self.writer = CheckpointWriter(self.provider, self.counter, retention=policy, async_save=async_save)

    def step(self) -> None:
        if self.train:
            train_one_step(self.model)
        self.counter.next_update()
        self.counter.add_samples(4)
        if self.counter.at_epoch_end:
            self.counter.next_epoch()

    def save(
        self, latest: bool = True, resumable: bool = True, metrics: dict | None = None, tag: str | None = None
    ) -> str:
        self.step()
        tag = tag or str(self.counter.cur_iteration)
        self.writer.save(
            self.model,
            tag,
            trainer=FakeTrainer(self.counter) if resumable else None,
            save_optim=resumable,
            save_latest_weights=latest,
            save_latest_optim=latest,
            metrics=metrics,
        )
        return tag


def tags(run_dir: Path, group: str = GROUP) -> list[str]:
    return [s.tag for s in scan_sets(run_dir) if s.group == group]


def progress_tags(run_dir: Path, group: str = GROUP) -> list[str]:
    return [t for t in tags(run_dir, group) if t.startswith("E")]


def resume_tag(run_dir: Path) -> str:
    return select_resume_set(run_dir, GROUP)[0].tag


def bytes_on_disk(folder: Path) -> int:
    """Every file of the folder, each inode once."""
    seen = {}
    for name in os.listdir(folder):
        st = os.lstat(folder / name)
        seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())
