"""`BaseTrainer`: the training loop of a ksuit model, with exact resume.

Subclasses override `loss(model, batch)`. This module is the loop and its stop on SIGTERM/SIGINT;
beside it: `settings` (the settings' rules), `loader`/`sampler` (the data order, resumable at any
update), `update` (one optimizer update), `devices`, `metrics`, `state`/`rng` (the trainer file:
what a resume restores), and `ksuit.callbacks` (checkpoints, EMA, validation, progress bar).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from torch.utils.data import DataLoader, Dataset

from ksuit.callbacks.base import Callback, with_unique_names
from ksuit.callbacks.progress import ProgressBarCallback
from ksuit.layout import LATEST
from ksuit.models.base import ModelBase, require_ksuit_model
from ksuit.models.optimizer import OptimizerWrapper
from ksuit.providers import PathProvider
from ksuit.readers import ResumePoint
from ksuit.retention import RetentionPolicy
from ksuit.schemas.trainer import CheckpointFormat, Device, Precision, Strategy, TrainerSettings
from ksuit.trainers import devices, state, update
from ksuit.trainers.loader import TrainLoader
from ksuit.trainers.metrics import MetricTracker
from ksuit.trainers.rng import seed_everything
from ksuit.trainers.signals import StopRequest, TrainingInterrupted
from ksuit.utils import distributed
from ksuit.utils.training import UpdateCounter
from ksuit.writers import CheckpointWriter, SaveSpec

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class BaseTrainer:
    """Trains a ksuit model (a `Model` or a `CompositeModel`) over a dataset.

    Override `loss(model, batch)`; everything else is configuration.

    Args:
        path_provider: where the run writes (`<output>/<run_id>/checkpoints`).
        callbacks: periodic work and checkpoints, see `ksuit.callbacks`.
        progress: add a `ProgressBarCallback` (rank 0, interactive terminals only).
        retention: which checkpoint sets the run keeps and its disk budget
            (`ksuit.retention.RetentionPolicy`; the run config's top-level `retention:`), or set
            on a `CheckpointCallback`: once per run.
        the other keywords: the settings, documented and validated by
            `ksuit.schemas.trainer.TrainerSettings` (the run config's `trainer:` section too),
            e.g. `effective_batch_size`, `max_epochs`, `precision`, `seed`.
    """

    def __init__(
        self,
        path_provider: PathProvider,
        *,
        effective_batch_size: int,
        max_epochs: int | None = None,
        max_updates: int | None = None,
        max_samples: int | None = None,
        accumulation_steps: int = 1,
        device: Device = "auto",
        precision: Precision = "float32",
        seed: int = 0,
        callbacks: Sequence[Callback] = (),
        num_workers: int = 0,
        num_threads: int | None = None,
        clip_grad_norm: float | None = None,
        async_save: bool = False,
        checkpoint_format: CheckpointFormat = "torch",
        strategy: Strategy = "ddp",
        checkpoint_mirror: str | None = None,
        progress: bool = False,
        retention: RetentionPolicy | None = None,
    ):
        # every argument named like a setting is one (tests check the signature matches them)
        arguments = {k: v for k, v in locals().items() if k in TrainerSettings.model_fields}
        if not isinstance(path_provider, PathProvider):
            raise TypeError(
                f"path_provider must be a ksuit.providers.PathProvider, got {type(path_provider).__name__}"
            )
        settings = TrainerSettings.from_arguments(**arguments)
        self.path_provider = path_provider
        self.end_iteration = settings.end_iteration
        self.effective_batch_size = settings.effective_batch_size
        self.accumulation_steps = settings.accumulation_steps
        self.device_name = settings.device
        self.precision = settings.precision
        self.seed = settings.seed
        self.num_workers = settings.num_workers
        self.num_threads = settings.num_threads
        self.clip_grad_norm = settings.clip_grad_norm
        self.async_save = settings.async_save
        self.checkpoint_format = settings.checkpoint_format
        self.strategy = settings.strategy
        self.checkpoint_mirror = settings.checkpoint_mirror
        self.progress = progress
        if retention is not None and not isinstance(retention, RetentionPolicy):
            retention = RetentionPolicy.model_validate(retention)
        self.retention = retention
        self.callbacks = with_unique_names([*callbacks, *([ProgressBarCallback()] if progress else [])])

        # set up by setup(); `model`, `update_counter` and `checkpoint_writer` read them and
        # raise a RuntimeError before
        self._model: ModelBase | None = None
        self._update_counter: UpdateCounter | None = None
        self._checkpoint_writer: CheckpointWriter | None = None
        self.ddp_model: torch.nn.parallel.DistributedDataParallel | None = None  # None: no DDP
        self.device = torch.device("cpu")
        self.grad_scaler: torch.amp.GradScaler | None = None  # None: not float16
        self.datasets: dict[str, Dataset[Any]] = {}
        self.batch_size = 0
        self.updates_per_epoch = 0
        self.world_size = 1
        self.rank = 0
        self.resumed_from: ResumePoint | None = None
        self.metric_tracker = MetricTracker()
        self._loaded_rng: dict[str, Any] | None = None
        # resumes on another number of processes, oldest first (the trainer file's 'elastic')
        self.elastic_events: list[dict[str, Any]] = []
        self._train_loader: TrainLoader | None = None

    # ---- the one method to override ---------------------------------------------------------
    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor | dict[str, torch.Tensor]:
        """The loss of one batch: a scalar tensor, or a dict of them with the key 'total'.

        `model` is what to call for the forward pass: the ksuit model itself, or its
        DistributedDataParallel wrapper under torchrun (then reach submodels through
        `trainer.model`, but run the forward through `model(...)` so gradients are synchronized).
        `batch` is what the DataLoader yields, already on `trainer.device`. Entries of a dict
        other than 'total' are logged as `loss/train/<key>`.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must override loss(model, batch) and return the loss of the batch"
        )

    # ---- what setup() builds ------------------------------------------------------------------
    @property
    def is_set_up(self) -> bool:
        """Whether `setup` (or `fit`) has run, so `model`, `update_counter` and
        `checkpoint_writer` exist."""
        return None not in (self._model, self._update_counter, self._checkpoint_writer)

    def _built_by_setup(self, value: _T | None, what: str) -> _T:
        if value is None:
            raise RuntimeError(
                f"{type(self).__name__}.{what} exists once the trainer is set up; "
                "call fit(model, data) or setup(model, data) first"
            )
        return value

    @property
    def model(self) -> ModelBase:
        """The ksuit model being trained (not its DDP wrapper); `setup` places it."""
        return self._built_by_setup(self._model, "model")

    @property
    def update_counter(self) -> UpdateCounter:
        """Where training stands (epoch, update, sample) and where it ends."""
        return self._built_by_setup(self._update_counter, "update_counter")

    @property
    def checkpoint_writer(self) -> CheckpointWriter:
        """The writer of this run's checkpoint files (its `format` is the run's `checkpoint_format`)."""
        return self._built_by_setup(self._checkpoint_writer, "checkpoint_writer")

    # ---- setup ------------------------------------------------------------------------------
    def setup(
        self,
        model: ModelBase,
        train_data: Dataset[Any] | DataLoader[Any],
        datasets: dict[str, Dataset[Any]] | None = None,
    ) -> None:
        """Prepares training without running it: places and initializes `model`, builds the
        training data loader, the update counter, the checkpoint writer (preparing the snapshot
        memory of asynchronous saves in the background) and (float16) the grad
        scaler, and seeds the generators with `seed + rank`. `fit` calls it; call it yourself to
        apply an initializer or `load_state_dict` outside of `fit`. `datasets` are further named
        datasets for callbacks (e.g. `{"val": ...}`)."""
        require_ksuit_model(model)
        self.world_size, self.rank = distributed.world_size(), distributed.rank()
        self.device = devices.resolve_device(self.device_name, self.world_size)
        self._train_loader = TrainLoader(
            train_data,
            effective_batch_size=self.effective_batch_size,
            accumulation_steps=self.accumulation_steps,
            seed=self.seed,
            world_size=self.world_size,
            rank=self.rank,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        self.batch_size = self._train_loader.batch_size
        self.updates_per_epoch = self._train_loader.updates_per_epoch
        model.to(self.device)
        if self.strategy == "fsdp" and devices.shard_leaves(model, self.device):
            model.initialize()  # optimizers over the sharded parameters (built anew if they existed)
        elif not model.is_initialized:
            model.initialize()
        self._model = model
        # the dataset of a DataLoader given as training data, as callbacks evaluate datasets
        self.datasets = {"train": self._train_loader.dataset, **(datasets or {})}
        self._update_counter = UpdateCounter(
            None, self.end_iteration, self.updates_per_epoch, self.effective_batch_size
        )
        self._checkpoint_writer = CheckpointWriter(
            self.path_provider,
            self._update_counter,
            async_save=self.async_save,
            format=self.checkpoint_format,
            mirror=self.checkpoint_mirror,
            retention=self._retention_policy(),
        )
        # async saving: map and touch the snapshot memory now, in the background
        self._checkpoint_writer.prepare(model)
        if self.precision == "float16":
            self.grad_scaler = torch.amp.GradScaler(self.device.type)
        seed_everything(self.seed + self.rank)

    def _retention_policy(self) -> RetentionPolicy | None:
        """The run's one retention policy: the trainer's or a callback's (`retention`), never two."""
        sources = [("the trainer's retention", self.retention)] if self.retention is not None else []
        sources += [
            (f"callback '{cb.name}'", policy)
            for cb in self.callbacks
            if isinstance(policy := getattr(cb, "retention", None), RetentionPolicy)
        ]
        if len(sources) > 1:
            raise ValueError(
                "retention is set more than once ("
                + ", ".join(name for name, _ in sources)
                + "); it governs "
                "the run's whole checkpoint folder: set it once, at the top of the run config or on one "
                "callback"
            )
        return sources[0][1] if sources else None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The autocast context of the configured precision (nothing for float32)."""
        return devices.autocast(self.precision, self.device)

    def to_device(self, batch: Any) -> Any:
        """`batch` with every tensor moved to `self.device` (lists, tuples and dicts walked)."""
        return devices.move_to_device(batch, self.device)

    split_loss = staticmethod(update.split_loss)

    @property
    def optimizers(self) -> list[OptimizerWrapper]:
        """The optimizers of the model's leaves (frozen leaves have none)."""
        return [leaf.optimizer for _, leaf in self.model.iter_leaves() if leaf.optimizer is not None]

    # ---- training -----------------------------------------------------------------------------
    def fit(
        self,
        model: ModelBase,
        train_data: Dataset[Any] | DataLoader[Any],
        *,
        datasets: dict[str, Dataset[Any]] | None = None,
        initializer: Any = None,
    ) -> ModelBase:
        """Trains `model` on `train_data` until the configured end and returns it.

        `datasets`: as in `setup`. `initializer` (a `ResumeInitializer` or
        `PreviousRunInitializer`) loads weights, and for a resume everything else, before the
        first update. Raises `TrainingInterrupted` after saving `latest` on SIGTERM/SIGINT.
        """
        threads = torch.get_num_threads()
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        try:
            self.setup(model, train_data, datasets)
            if initializer is not None:
                initializer.apply(self)
            if self.strategy == "ddp":
                self.ddp_model = devices.wrap_ddp(self.model, self.device, self.world_size)
            for cb in self._ordered_callbacks():
                cb.before_training(self)
            if self._loaded_rng is not None:
                # the last step before the loop: nothing may draw random numbers after it
                state.restore_rng(self, self._loaded_rng)
            try:
                self._loop()
            finally:
                self.checkpoint_writer.flush()
            for cb in self._ordered_callbacks():
                cb.after_training(self)
            self.checkpoint_writer.close()
        finally:
            for cb in self._ordered_callbacks():
                cb.teardown(self)
            torch.set_num_threads(threads)
        return self.model

    def _ordered_callbacks(self) -> list[Callback]:
        return sorted(self.callbacks, key=lambda cb: cb.order)

    def _loop(self) -> None:
        counter, loader = self.update_counter, self._train_loader
        assert loader is not None  # fit() runs the loop after setup()
        if counter.is_finished:
            logger.info("training already reached its end (%s); nothing to train", counter.end_iteration)
            return
        if self.rank == 0:
            steps = f", {self.accumulation_steps} accumulation steps" if self.accumulation_steps > 1 else ""
            logger.info(
                f"training {self.model.name} from {counter.cur_iteration} to {counter.end_iteration}: "
                f"{self.updates_per_epoch} updates per epoch of {self.effective_batch_size} samples "
                f"({self.batch_size} per process and step{steps}), "
                f"device {self.device}, precision {self.precision}"
            )
        train_model = self.ddp_model or self.model
        self.model.train()
        for optim in self.optimizers:
            optim.zero_grad()
        with StopRequest() as stop:
            while not counter.is_finished:
                epoch = counter.epoch
                done_in_epoch = counter.update - epoch * self.updates_per_epoch
                batches = loader.epoch(epoch, done_in_epoch)
                for _ in range(self.updates_per_epoch - done_in_epoch):
                    losses = update.optimizer_update(self, train_model, batches)
                    counter.next_update()
                    counter.add_samples(self.effective_batch_size)
                    if counter.at_epoch_end:
                        counter.next_epoch()
                    self._after_update(losses)
                    # every rank must stop at the same update: agree on the largest signal seen
                    signum = distributed.all_reduce_max_int(stop.signum or 0, self.device)
                    if signum:
                        self._stop_on_signal(signum)
                    if counter.is_finished:
                        break
                del batches

    def _after_update(self, losses: dict[str, torch.Tensor]) -> None:
        counter, tracker = self.update_counter, self.metric_tracker
        tracker.add_losses(losses)
        if counter.at_epoch_end:
            tracker.log_mean_losses(counter.update, self.device)
        for cb in self._ordered_callbacks():
            cb.after_update(self)
        if self.rank == 0:
            tracker.log_fresh(counter.update, counter.cur_iteration)

    # ---- metrics ----------------------------------------------------------------------------------
    def log_metric(self, key: str, value: float) -> None:
        """Records a metric of the current update (read by e.g. `BestCheckpointCallback`)."""
        self.metric_tracker.log(key, value, self.update_counter.update)

    @property
    def metrics(self) -> dict[str, float]:
        """The latest value of every metric logged, e.g. `{"loss/train": 0.12, "loss/val": 0.15}`."""
        return self.metric_tracker.values

    @property
    def metric_updates(self) -> dict[str, int]:
        """The update at which each metric was last logged."""
        return self.metric_tracker.updates

    # ---- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(
        self, checkpoint_tag: str, spec: SaveSpec = SaveSpec(), *, include_trainer: bool = True
    ) -> list[str]:
        """Saves the model through `CheckpointWriter.save_spec` (with this trainer's state when
        `include_trainer`), then tells every callback which tags now hold a trainer file; the
        files the callbacks write then join the same atomic set switch (`CheckpointWriter.batch`).

        Every rank must call it (the trainer state gathers RNG states); only rank 0 writes.
        Returns the tags written with a trainer file.
        """
        tags = spec.trainer_tags(checkpoint_tag) if include_trainer else []
        # one atomic switch for the model, optimizer and trainer files and whatever the callbacks
        # add for the same tags (EMA weights): a crash leaves all of them old or all new; the
        # latest metrics go into every manifest (for retention's keep_best)
        with self.checkpoint_writer.batch(metrics=self.metrics):
            self.checkpoint_writer.save_spec(
                self.model, checkpoint_tag, spec, trainer=self if include_trainer else None
            )
            if tags:
                for cb in self._ordered_callbacks():
                    cb.on_resumable_save(self, tags)
        return tags

    def _stop_on_signal(self, signum: int) -> None:
        it = self.update_counter.cur_iteration.copy()
        if self.rank == 0:
            logger.warning("received signal %d: saving '%s' at %s before stopping", signum, LATEST, it)
        self.save_checkpoint(LATEST, SaveSpec(save_weights=True, save_optim=True))
        self.checkpoint_writer.close()
        raise TrainingInterrupted(signum, it, LATEST, str(self.path_provider.run_output_path))

    # ---- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything beyond weights and optimizer states that a resume restores (the trainer
        file, see `ksuit.trainers.state`). Gathers every rank's RNG state: every rank must call it."""
        return state.trainer_state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Restores `state_dict()`'s output into a set-up trainer (after `setup`, as initializers
        do); refuses another data layout or (with `strict`) set of callbacks. Another world size
        is an elastic resume (`ksuit.trainers.state`)."""
        state.load_trainer_state_dict(self, state_dict, strict)
        self._loaded_rng = state_dict["rng"]  # restored again right before the first update

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(end={self.end_iteration}, effective_batch_size={self.effective_batch_size})"
