"""`BaseTrainer`: trains a ksuit model and keeps every bit of state a resume needs.

Subclasses supply the loss by overriding one method, `loss(model, batch)`. The trainer owns the
loop (gradient accumulation, mixed precision, DDP), the progress (`UpdateCounter`), the files
(`CheckpointWriter`, through callbacks) and the state that makes a resumed run continue exactly
like an uninterrupted one: counter, callbacks, grad scaler, every rank's RNG and data order.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ksuit.callbacks.base import Callback
from ksuit.layout import LATEST
from ksuit.models.base import ModelBase, unwrap_check
from ksuit.providers import PathProvider
from ksuit.readers import ResumePoint
from ksuit.trainers import rng
from ksuit.trainers.sampler import ResumableBatchSampler
from ksuit.trainers.signals import StopRequest, TrainingInterrupted
from ksuit.utils import distributed
from ksuit.utils.training import TrainingIteration, UpdateCounter
from ksuit.writers import CheckpointWriter

logger = logging.getLogger(__name__)

PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")


def seed_everything(seed: int) -> None:
    """Seeds python's, numpy's and torch's (CPU and CUDA) global generators."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class BaseTrainer:
    """Trains a ksuit model (a `Model` or a `CompositeModel`) over a dataset.

    Override `loss(model, batch)`; everything else is configuration:

    Args:
        path_provider: where the run writes (`<output>/<run_id>/checkpoints`).
        max_epochs, max_updates, max_samples: when training ends; give exactly one.
        effective_batch_size: samples per optimizer update, over all processes and accumulation
            steps. Each process draws `effective_batch_size / (world_size * accumulation_steps)`
            samples per forward pass; it must divide exactly.
        accumulation_steps: forward/backward passes per update (gradient accumulation).
        device: "auto" (CUDA when available), "cpu" or "cuda". Under torchrun each process uses
            `cuda:<LOCAL_RANK>`.
        precision: "float32", "bfloat16" (autocast) or "float16" (autocast and a GradScaler).
        seed: seeds the global generators (plus the rank) and the data order (epoch `e` uses a
            permutation drawn with `seed + e`).
        callbacks: periodic work and checkpoints, see `ksuit.callbacks`.
        num_workers: DataLoader workers. With 0 (the default) a resumed run is bitwise equal to
            an uninterrupted one; with workers it is too unless the dataset itself draws random
            numbers (augmentations), whose worker seeds depend on the batch order.
        num_threads: torch CPU threads during `fit` (default: torch's choice). Small models
            train fastest on one; a resumed run must use the same number to be bitwise equal.
        clip_grad_norm: clip the gradient norm of all trainable parameters to this value.
        async_save, checkpoint_format: passed to `CheckpointWriter` (`async_save`, `format`).
        progress: show a rich progress bar (rank 0, interactive terminals only).

    The data order is reproducible: the last partial batch of an epoch is dropped, so every
    epoch has exactly `updates_per_epoch` updates and a tag such as `E3_U70_S4480` says how
    far into an epoch a checkpoint was taken.
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
        device: str = "auto",
        precision: str = "float32",
        seed: int = 0,
        callbacks: Sequence[Callback] = (),
        num_workers: int = 0,
        num_threads: int | None = None,
        clip_grad_norm: float | None = None,
        async_save: bool = False,
        checkpoint_format: str = "torch",
        progress: bool = False,
    ):
        if not isinstance(path_provider, PathProvider):
            raise TypeError(
                f"path_provider must be a ksuit.providers.PathProvider, got {type(path_provider).__name__}"
            )
        ends = {
            k: v
            for k, v in (("epoch", max_epochs), ("update", max_updates), ("sample", max_samples))
            if v is not None
        }
        if len(ends) != 1:
            given = ", ".join(f"max_{k}s" for k in ends) or "none"
            raise ValueError(f"give exactly one of max_epochs, max_updates, max_samples (given: {given})")
        for what, value in (
            ("effective_batch_size", effective_batch_size),
            ("accumulation_steps", accumulation_steps),
            *((f"max_{k}s", v) for k, v in ends.items()),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{what} must be a positive int, got {value!r}")
        if device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads <= 0):
            raise ValueError(f"num_threads must be a positive int or None, got {num_threads!r}")
        self.path_provider = path_provider
        self.end_iteration = TrainingIteration(**ends)
        self.effective_batch_size = effective_batch_size
        self.accumulation_steps = accumulation_steps
        self.device_name = device
        self.precision = precision
        self.seed = int(seed)
        self.num_workers = num_workers
        self.num_threads = num_threads
        self.clip_grad_norm = clip_grad_norm
        self.async_save = async_save
        self.checkpoint_format = checkpoint_format
        self.progress = progress
        self.callbacks = self._unique_names(list(callbacks))

        # set up by fit()
        self.model: ModelBase | None = None
        self.ddp_model: torch.nn.parallel.DistributedDataParallel | None = None
        self.device = torch.device("cpu")
        self.update_counter: UpdateCounter | None = None
        self.checkpoint_writer: CheckpointWriter | None = None
        self.grad_scaler: torch.amp.GradScaler | None = None
        self.datasets: dict[str, Dataset] = {}
        self.batch_size = 0
        self.updates_per_epoch = 0
        self.world_size = 1
        self.rank = 0
        self.resumed_from: ResumePoint | None = None
        self.metrics: dict[str, float] = {}
        self.metric_updates: dict[str, int] = {}
        self._loss_sums: dict[str, float] = {}
        self._loss_updates = 0
        self._loaded_rng: dict[str, Any] | None = None
        self._batch_sampler: ResumableBatchSampler | None = None
        self._loader_generator = torch.Generator()
        self._train_loader: DataLoader | None = None

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

    # ---- setup ------------------------------------------------------------------------------
    @staticmethod
    def _unique_names(callbacks: list[Callback]) -> list[Callback]:
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(
                    f"callbacks must be ksuit.callbacks.Callback instances, got {type(cb).__name__}"
                )
        explicit = [cb.name for cb in callbacks if not cb.name_is_default]
        duplicates = sorted({n for n in explicit if explicit.count(n) > 1})
        if duplicates:
            raise ValueError(f"callback names must be unique; repeated: {', '.join(duplicates)}")
        taken = set(explicit)
        for cb in callbacks:
            if cb.name_is_default:
                name, i = cb.name, 1
                while name in taken:
                    i += 1
                    name = f"{cb.name}.{i}"
                cb.name = name
                taken.add(name)
        return callbacks

    def _resolve_device(self) -> torch.device:
        want = self.device_name
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(
                    "device 'cuda' was requested but CUDA is not available; use device: cpu or auto"
                )
            return torch.device(
                "cuda",
                int(os.environ.get("LOCAL_RANK", "0"))
                if self.world_size > 1
                else torch.cuda.current_device(),
            )
        return torch.device("cpu")

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of the configured precision (nothing for float32)."""
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def to_device(self, batch: Any) -> Any:
        """`batch` with every tensor moved to `self.device` (lists, tuples and dicts walked)."""
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device, non_blocking=self.device.type == "cuda")
        if isinstance(batch, dict):
            return {k: self.to_device(v) for k, v in batch.items()}
        if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
            return type(batch)(*(self.to_device(v) for v in batch))
        if isinstance(batch, (list, tuple)):
            return type(batch)(self.to_device(v) for v in batch)
        return batch

    def _build_loader(self, data: Dataset | DataLoader) -> DataLoader:
        collate_fn = None
        dataset = data
        if isinstance(data, DataLoader):
            dataset, collate_fn = data.dataset, data.collate_fn
            logger.info(
                "using the DataLoader's dataset and collate_fn; ksuit's resumable sampler draws the batches"
            )
        try:
            n = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError("the training data must be a map-style Dataset with a length") from None
        self._batch_sampler = ResumableBatchSampler(
            n, self.batch_size, seed=self.seed, shuffle=True, num_replicas=self.world_size, rank=self.rank
        )
        batches = len(self._batch_sampler)
        self.updates_per_epoch = batches // self.accumulation_steps
        if self.updates_per_epoch == 0:
            raise ValueError(
                f"the training data has {n} samples, fewer than one update needs "
                f"(effective_batch_size {self.effective_batch_size}); lower effective_batch_size"
            )
        dropped = n - self.updates_per_epoch * self.effective_batch_size
        if dropped and self.rank == 0:
            logger.info(
                "each epoch uses %d of %d samples (%d updates of %d); the rest is left out",
                n - dropped,
                n,
                self.updates_per_epoch,
                self.effective_batch_size,
            )
        kwargs: dict[str, Any] = {}
        if collate_fn is not None:
            kwargs["collate_fn"] = collate_fn
        return DataLoader(
            dataset,
            batch_sampler=self._batch_sampler,
            num_workers=self.num_workers,
            generator=self._loader_generator,
            pin_memory=self.device.type == "cuda",
            **kwargs,
        )

    def _setup(
        self, model: ModelBase, train_data: Dataset | DataLoader, datasets: dict[str, Dataset] | None
    ) -> None:
        unwrap_check(model)
        self.world_size, self.rank = distributed.world_size(), distributed.rank()
        self.device = self._resolve_device()
        per_step = self.world_size * self.accumulation_steps
        if self.effective_batch_size % per_step:
            raise ValueError(
                f"effective_batch_size {self.effective_batch_size} is not divisible by world size "
                f"{self.world_size} x accumulation_steps {self.accumulation_steps}"
            )
        self.batch_size = self.effective_batch_size // per_step
        model.to(self.device)
        if not model.is_initialized:
            model.initialize()
        self.model = model
        self.datasets = {"train": train_data, **(datasets or {})}
        self._train_loader = self._build_loader(train_data)
        self.update_counter = UpdateCounter(
            None, self.end_iteration, self.updates_per_epoch, self.effective_batch_size
        )
        self.checkpoint_writer = CheckpointWriter(
            self.path_provider, self.update_counter, async_save=self.async_save, format=self.checkpoint_format
        )
        if self.precision == "float16":
            self.grad_scaler = torch.amp.GradScaler(self.device.type)
        seed_everything(self.seed + self.rank)

    def _wrap_ddp(self) -> None:
        trainable = any(p.requires_grad for p in self.model.parameters())
        if self.world_size > 1 and trainable:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)

    @property
    def optimizers(self) -> list:
        return [leaf.optimizer for _, leaf in self.model.iter_leaves() if leaf.optimizer is not None]

    # ---- training -----------------------------------------------------------------------------
    def fit(
        self,
        model: ModelBase,
        train_data: Dataset | DataLoader,
        *,
        datasets: dict[str, Dataset] | None = None,
        initializer: Any = None,
    ) -> ModelBase:
        """Trains `model` on `train_data` until the configured end and returns it.

        `datasets` are further named datasets for callbacks (e.g. `{"val": ...}` for
        `ValidationLossCallback`). `initializer` (a `ResumeInitializer` or
        `PreviousRunInitializer`) loads weights, and for a resume everything else, before the
        first update. Raises `TrainingInterrupted` after saving `latest` on SIGTERM/SIGINT.
        """
        threads = torch.get_num_threads()
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        try:
            self._setup(model, train_data, datasets)
            if initializer is not None:
                initializer.apply(self)
            self._wrap_ddp()
            for cb in self._ordered_callbacks():
                cb.before_training(self)
            if self._loaded_rng is not None:
                # the last step before the loop: nothing may draw random numbers after it
                rng.restore_own_rank(self._loaded_rng)
            try:
                self._loop()
            finally:
                self.checkpoint_writer.flush()
            for cb in self._ordered_callbacks():
                cb.after_training(self)
            self.checkpoint_writer.close()
        finally:
            torch.set_num_threads(threads)
        return self.model

    def _ordered_callbacks(self) -> list[Callback]:
        return sorted(self.callbacks, key=lambda cb: cb.order)

    def _loop(self) -> None:
        counter = self.update_counter
        start = counter.cur_iteration.copy()
        if counter.is_finished:
            logger.info("training already reached its end (%s); nothing to train", counter.end_iteration)
            return
        if self.rank == 0:
            logger.info(
                "training %s from %s to %s: %d updates per epoch of %d samples (%d per process and step%s), "
                "device %s, precision %s",
                self.model.name,
                start,
                counter.end_iteration,
                self.updates_per_epoch,
                self.effective_batch_size,
                self.batch_size,
                f", {self.accumulation_steps} accumulation steps" if self.accumulation_steps > 1 else "",
                self.device,
                self.precision,
            )
        train_model = self.ddp_model or self.model
        self.model.train()
        for optim in self.optimizers:
            optim.zero_grad()
        with StopRequest() as stop, self._progress_bar(start) as advance:
            while not counter.is_finished:
                epoch = counter.epoch
                done_in_epoch = counter.update - epoch * self.updates_per_epoch
                self._batch_sampler.set_epoch(epoch, done_in_epoch * self.accumulation_steps)
                self._loader_generator.manual_seed(self.seed + epoch)
                batches = iter(self._train_loader)
                for _ in range(self.updates_per_epoch - done_in_epoch):
                    losses = self._update(train_model, batches)
                    counter.next_update()
                    counter.add_samples(self.effective_batch_size)
                    if counter.is_full_epoch:
                        counter.next_epoch()
                    self._after_update(losses)
                    advance()
                    # every rank must stop at the same update: agree on the largest signal seen
                    signum = distributed.all_reduce_max_int(stop.signum or 0, self.device)
                    if signum:
                        self._stop_on_signal(signum)
                    if counter.is_finished:
                        break
                del batches

    def _update(self, train_model: torch.nn.Module, batches: Iterator) -> dict[str, torch.Tensor]:
        """One optimizer update over `accumulation_steps` batches; returns the detached losses."""
        totals: dict[str, torch.Tensor] = {}
        steps = self.accumulation_steps
        for step in range(steps):
            batch = self.to_device(next(batches))
            last = step == steps - 1
            sync = contextlib.nullcontext() if last or self.ddp_model is None else self.ddp_model.no_sync()
            with sync:
                with self.autocast():
                    out = self.loss(train_model, batch)
                total, parts = self.split_loss(out)
                scaled = total / steps if steps > 1 else total
                if self.grad_scaler is not None:
                    self.grad_scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            for key, value in {"total": total, **parts}.items():
                value = value.detach().float() / steps
                totals[key] = totals[key] + value if key in totals else value
        optimizers = self.optimizers
        if self.clip_grad_norm is not None:
            if self.grad_scaler is not None:
                for optim in optimizers:
                    self.grad_scaler.unscale_(optim.torch_optim)
            params = [p for p in self.model.parameters() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
        for optim in optimizers:
            optim.step(self.grad_scaler)
        if self.grad_scaler is not None:
            self.grad_scaler.update()
        for optim in optimizers:
            optim.zero_grad()
        return totals

    @staticmethod
    def split_loss(out: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if isinstance(out, torch.Tensor):
            if out.numel() != 1:
                raise ValueError(f"loss() returned a tensor of shape {tuple(out.shape)}; return a scalar")
            return out.reshape(()), {}
        if isinstance(out, dict):
            if "total" not in out:
                raise KeyError(f"loss() returned a dict without 'total' (keys: {', '.join(map(str, out))})")
            parts = {str(k): v for k, v in out.items() if k != "total"}
            return out["total"].reshape(()), parts
        raise TypeError(
            f"loss() must return a scalar tensor or a dict with 'total', got {type(out).__name__}"
        )

    def _after_update(self, losses: dict[str, torch.Tensor]) -> None:
        for key, value in losses.items():
            self._loss_sums[key] = self._loss_sums.get(key, 0.0) + float(value.item())
        self._loss_updates += 1
        counter = self.update_counter
        if counter.is_full_epoch:
            keys = sorted(self._loss_sums)
            sums = distributed.all_reduce_sum(
                [self._loss_sums[k] for k in keys] + [self._loss_updates], self.device
            )
            for key, total in zip(keys, sums[:-1], strict=True):
                self.log_metric("loss/train" if key == "total" else f"loss/train/{key}", total / sums[-1])
            self._loss_sums, self._loss_updates = {}, 0
        for cb in self._ordered_callbacks():
            cb.after_update(self)
        fresh = {k: v for k, v in self.metrics.items() if self.metric_updates.get(k) == counter.update}
        if fresh and self.rank == 0:
            shown = "  ".join(f"{k} {v:.6g}" for k, v in sorted(fresh.items()))
            logger.info("%s  %s", counter.cur_iteration, shown)

    def log_metric(self, key: str, value: float) -> None:
        """Records a metric of the current update (read by e.g. `BestCheckpointCallback`)."""
        self.metrics[key] = float(value)
        self.metric_updates[key] = self.update_counter.update

    @contextlib.contextmanager
    def _progress_bar(self, start: TrainingIteration):
        from rich.console import Console
        from rich.logging import RichHandler

        # share the console of ksuit's rich log handler (if any) so log lines print above the bar
        handlers = [h for h in logging.getLogger("ksuit").handlers if isinstance(h, RichHandler)]
        console = handlers[0].console if handlers else Console(stderr=True)
        if not (self.progress and self.rank == 0 and console.is_terminal):
            yield lambda: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[iteration]}"),
        )
        total = self.update_counter.end_iteration.update
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task(self.model.name, total=total, completed=start.update, iteration=str(start))

            def advance() -> None:
                bar.update(task, advance=1, iteration=str(self.update_counter.cur_iteration))

            yield advance

    # ---- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(
        self,
        checkpoint_tag: str,
        *,
        include_trainer: bool = True,
        save_weights: bool = True,
        save_optim: bool = True,
        save_latest_weights: bool = False,
        save_latest_optim: bool = False,
        model_names: list[str] | None = None,
        save_frozen_weights: bool = True,
    ) -> list[str]:
        """Saves the model through `CheckpointWriter.save` (with this trainer's state when
        `include_trainer`), then tells every callback which tags now hold a trainer file; the
        files the callbacks write then join the same atomic set switch (`CheckpointWriter.batch`).

        Every rank must call it (the trainer state gathers RNG states); only rank 0 writes.
        Returns the tags written with a trainer file.
        """
        tags = [checkpoint_tag] if include_trainer else []
        if include_trainer and (save_latest_weights or save_latest_optim) and checkpoint_tag != LATEST:
            tags.append(LATEST)
        # one atomic switch for the model, optimizer and trainer files and whatever the callbacks
        # add for the same tags (EMA weights): a crash leaves all of them old or all new
        with self.checkpoint_writer.batch():
            self.checkpoint_writer.save(
                self.model,
                checkpoint_tag,
                trainer=self if include_trainer else None,
                save_weights=save_weights,
                save_optim=save_optim,
                save_latest_weights=save_latest_weights,
                save_latest_optim=save_latest_optim,
                model_names_to_save=model_names,
                save_frozen_weights=save_frozen_weights,
            )
            if tags:
                for cb in self._ordered_callbacks():
                    cb.on_resumable_save(self, tags)
        return tags

    def _stop_on_signal(self, signum: int) -> None:
        it = self.update_counter.cur_iteration.copy()
        if self.rank == 0:
            logger.warning("received signal %d: saving '%s' at %s before stopping", signum, LATEST, it)
        self.save_checkpoint(LATEST, save_weights=True, save_optim=True)
        self.checkpoint_writer.close()
        raise TrainingInterrupted(signum, it, LATEST, str(self.path_provider.run_output_path))

    # ---- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything beyond weights and optimizer states that a resume restores.

        `{callback_state_dicts, training_iteration, grad_scaler (float16 only), rng, data,
        metrics, train_loss}`; plain values and tensors only (loads with `weights_only=True`).
        Gathers the RNG states of every rank, so every rank must call it.
        """
        state: dict[str, Any] = {
            "callback_state_dicts": {cb.name: cb.state_dict() for cb in self.callbacks},
            "training_iteration": dict(self.update_counter.cur_iteration),
        }
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        state["rng"] = rng.capture_all_ranks()
        state["data"] = {
            "seed": self.seed,
            "world_size": self.world_size,
            "effective_batch_size": self.effective_batch_size,
            "accumulation_steps": self.accumulation_steps,
            "updates_per_epoch": self.updates_per_epoch,
        }
        state["metrics"] = {
            k: {"value": v, "update": self.metric_updates.get(k, -1)} for k, v in self.metrics.items()
        }
        state["train_loss"] = {"sums": dict(self._loss_sums), "updates": self._loss_updates}
        return state

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Restores `state_dict()`'s output: counter, callbacks (by name), grad scaler, metrics
        and this rank's RNG. Refuses another world size or data layout, and (with `strict`)
        callbacks missing from either side, naming them. Call it after `fit` set up the run
        (initializers do)."""
        if self.update_counter is None:
            raise RuntimeError(
                "load_state_dict needs a set-up trainer; pass the initializer to fit() instead"
            )
        missing_keys = [
            k for k in ("callback_state_dicts", "training_iteration", "rng") if k not in state_dict
        ]
        if missing_keys:
            raise ValueError(f"trainer state lacks {', '.join(missing_keys)}; is it a ksuit trainer file?")
        self._check_data(state_dict.get("data", {}), int(state_dict["rng"]["world_size"]))
        saved = state_dict["callback_state_dicts"]
        names = [cb.name for cb in self.callbacks]
        missing = [n for n in names if n not in saved]
        unexpected = [n for n in saved if n not in names]
        if strict and (missing or unexpected):
            parts = []
            if missing:
                parts.append(f"callbacks without saved state: {', '.join(missing)}")
            if unexpected:
                parts.append(f"saved state of unknown callbacks: {', '.join(unexpected)}")
            raise ValueError(
                "callback states do not match the callbacks of this run (" + "; ".join(parts) + "); "
                "resume with the callbacks (and names) of the run that wrote the checkpoint"
            )
        for cb in self.callbacks:
            if cb.name in saved:
                cb.load_state_dict(saved[cb.name])
        self.update_counter.load_state_dict(state_dict["training_iteration"])
        it = self.update_counter.cur_iteration
        if not it.is_fully_specified or it.epoch != it.update // self.updates_per_epoch:
            raise ValueError(
                f"checkpoint iteration {it} does not fit {self.updates_per_epoch} updates per epoch; "
                "resume with the data and batch size of the run that wrote it"
            )
        if self.grad_scaler is not None:
            if "grad_scaler" in state_dict:
                self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
            else:
                logger.warning(
                    "the checkpoint has no grad scaler state (it was not trained in float16); "
                    "the scaler starts fresh"
                )
        elif "grad_scaler" in state_dict:
            logger.warning(
                "the checkpoint has a grad scaler state but this run does not use float16; ignored"
            )
        self.metrics = {k: float(v["value"]) for k, v in state_dict.get("metrics", {}).items()}
        self.metric_updates = {k: int(v["update"]) for k, v in state_dict.get("metrics", {}).items()}
        loss = state_dict.get("train_loss", {"sums": {}, "updates": 0})
        self._loss_sums = {k: float(v) for k, v in loss["sums"].items()}
        self._loss_updates = int(loss["updates"])
        self._loaded_rng = state_dict["rng"]
        rng.restore_own_rank(self._loaded_rng)

    def _check_data(self, data: dict[str, Any], saved_world_size: int) -> None:
        if saved_world_size != self.world_size:
            hint = (
                f"torchrun --nproc_per_node={saved_world_size} ..."
                if saved_world_size > 1
                else "a single process (without torchrun)"
            )
            raise ValueError(
                f"the checkpoint was written by {saved_world_size} process(es) "
                f"but this run has {self.world_size}; "
                f"resume with the same world size: {hint}"
            )
        for key, now in (
            ("updates_per_epoch", self.updates_per_epoch),
            ("effective_batch_size", self.effective_batch_size),
            ("accumulation_steps", self.accumulation_steps),
            ("seed", self.seed),
        ):
            if key in data and int(data[key]) != now:
                raise ValueError(
                    f"the checkpoint was written with {key}={data[key]} but this run has {key}={now}; "
                    "the data order could not continue where it stopped. Resume with the same config, "
                    "or start a new run from "
                    "its weights (PreviousRunInitializer)"
                )

    # ---- reporting ------------------------------------------------------------------------------
    def estimated_updates_left(self) -> int:
        return max(0, self.update_counter.end_iteration.update - self.update_counter.update)

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(end={self.end_iteration}, effective_batch_size={self.effective_batch_size})"
