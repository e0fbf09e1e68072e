"""`CheckpointWriter`: writes a model, its optimizers and the trainer as a structured set of files.

File names come from `ksuit.layout`; bytes reach the medium through a `ksuit.storage` backend
(atomic, checksummed, optionally asynchronous). This module only decides *what* is written: the
save plan is `ksuit.writers.plan`, the payloads `ksuit.writers.payload`; what is kept afterwards
is `ksuit.retention`'s (a `RetentionPolicy` applied around every save).
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ksuit.layout import (
    SHARDED_FORMAT,
    checkpoint_filename,
    parse_checkpoint_filename,
    validate_output_name,
    validate_tag,
)
from ksuit.models.base import ModelBase, require_ksuit_model
from ksuit.models.selection import select_leaves
from ksuit.retention import Retention, RetentionPolicy
from ksuit.schemas.models import ModelBaseConfig
from ksuit.storage import (
    AsyncSetWriter,
    PendingFile,
    SetSink,
    SetWriter,
    WrittenFile,
    open_backend,
    set_storage_options,
)
from ksuit.storage.formats import format_of_path, get_format
from ksuit.storage.mirror import MirroringSetWriter, ReplicationFailure
from ksuit.storage.snapshot import SnapshotPool
from ksuit.utils import distributed
from ksuit.utils.distributed import is_rank0
from ksuit.utils.gc_pause import gc_paused
from ksuit.writers.payload import check_metrics, check_state_dict, model_payload
from ksuit.writers.plan import SaveSpec
from ksuit.writers.sharding import is_sharded, sharded_group
from ksuit.writers.sizing import snapshot_nbytes

if TYPE_CHECKING:
    from ksuit.providers import PathProvider
    from ksuit.utils.training import TrainingIteration, UpdateCounter


class SupportsStateDict(Protocol):
    """What the writer needs of a trainer: its resume state (`ksuit.trainers.BaseTrainer`)."""

    def state_dict(self) -> dict[str, Any]: ...


class SupportsIteration(Protocol):
    """What the writer needs of an update counter: where training stands
    (`ksuit.utils.training.UpdateCounter`, or a plain loop's `ksuit.LoopState`)."""

    @property
    def cur_iteration(self) -> TrainingIteration: ...


class CheckpointKeys(enum.StrEnum):
    """Defines the standard, possible keys in the checkpoint dict."""

    STATE_DICT = "state_dict"
    """The pytorch state dict of the model. I.e. the model weights/tensors/buffers."""
    CHECKPOINT_TAG = "checkpoint_tag"
    """The checkpoint tag, e.g., "E10_U200_S800" or "latest"."""
    TRAINING_ITERATION = "training_iteration"
    """The detailed information about training iteration as a dict with keys 'epoch', 'update',
    and 'sample'."""
    RUN_ID = "run_id"
    """The ID of the run from which this checkpoint was created."""
    MODEL_CONFIG = "model_config"
    """The model configuration used to instantiate the model. A serialized dict of the pydantic
    model config."""
    CONFIG_KIND = "config_kind"
    """The kind (i.e., class path) of the model configuration. Used to instantiate the correct
    model configuration."""
    CALLBACK_STATE_DICTS = "callback_state_dicts"
    """The state dicts of the callbacks."""
    GRAD_SCALER = "grad_scaler"
    """The state dict of the grad scaler (if used)."""


class CheckpointWriter:
    """Class to easily write checkpoints in a structured way to the disk.

    Each model is stored in a separate file, weights and optimizer state in separate files too,
    so runs keep only the files they need (e.g. encoder weights every 10 epochs, plus the
    `latest` weights and optimizer states of every submodel to resume).

    Args:
        path_provider: where the run writes (`checkpoint_path`) and its `run_id`.
        update_counter: the training progress recorded in every file.
        async_save: snapshot tensors into reused host buffers and write in a background thread;
            `flush()` waits for pending writes and re-raises a failure.
        max_pending: at most this many snapshots exist at once (async only); the next save waits.
        format: "torch" (`.th`) or "safetensors" for weights files; optimizer and trainer files
            are always `.th`.
        retention: which sets to keep and the disk budget (`ksuit.retention.RetentionPolicy`),
            applied after every save commits (and, with a budget, before it is written), on the
            thread that writes: the background thread with `async_save`.
        spread_replicated: under torch.distributed, write replicated (DDP) weights and optimizer
            states as sharded checkpoints too, every rank writing a share of the bytes, instead
            of rank 0 writing `.th` files (measured in `make bench`; off by default).
        mirror: an output root (e.g. `"s3://bucket/runs"`) to replicate every committed set to,
            in the background, under the same `<run_id>[/<stage>]/checkpoints`: saves run at
            local speed, and a run resumes from whichever copy holds the newer complete set
            (`ResumeInitializer(..., mirror=...)`). A failed upload is retried, then logged and
            listed in `mirror_failures`; it never fails a save or touches the local files.

    Sharded models: a leaf whose parameters are DTensors (FSDP2 `fully_shard`) is saved as a
    sharded checkpoint folder (`<name>_cp=<tag>_model.dcp/`, and `..._optim.dcp/`) through
    torch.distributed.checkpoint: every rank must then call `save` (it is a collective), each
    writes its own shards, and rank 0 commits the set once every rank's part is durable
    (`ksuit.storage.sets.SetWriter`). Without sharded leaves only rank 0 writes.
    """

    def __init__(
        self,
        path_provider: PathProvider,
        update_counter: UpdateCounter | SupportsIteration,
        *,
        async_save: bool = False,
        max_pending: int = 1,
        format: str = "torch",
        retention: RetentionPolicy | None = None,
        spread_replicated: bool = False,
        mirror: str | Path | None = None,
    ):
        if not hasattr(path_provider, "checkpoint_path") or not hasattr(path_provider, "run_id"):
            raise TypeError(
                f"path_provider must be a ksuit.providers.PathProvider, got {type(path_provider).__name__}"
            )
        if not hasattr(update_counter, "cur_iteration"):
            raise TypeError(
                "update_counter must be a ksuit.utils.training.UpdateCounter, "
                f"got {type(update_counter).__name__}"
            )
        get_format(format)
        if not isinstance(max_pending, int) or isinstance(max_pending, bool) or max_pending < 1:
            raise ValueError(f"max_pending must be an int >= 1, got {max_pending!r}")
        self.logger = logging.getLogger(__name__)
        self.path_provider = path_provider
        self.update_counter = update_counter
        self.async_save = bool(async_save)
        self.max_pending = max_pending
        self.format = format
        self.spread_replicated = bool(spread_replicated)
        if mirror is not None and (not isinstance(mirror, (str, Path)) or str(mirror) == ""):
            raise TypeError(f"mirror must be an output root path or URL, got {mirror!r}")
        self.mirror = mirror
        self._past_failures: list[ReplicationFailure] = []
        self._sink: SetSink | None = None
        self._batch: list[PendingFile] | None = None
        self._batch_metrics: dict[str, float] | None = None
        if retention is not None and not isinstance(retention, RetentionPolicy):
            retention = RetentionPolicy.model_validate(retention)
        self._retention = Retention(retention) if retention is not None else None

    # ---- public API -------------------------------------------------------------------------
    def save_model_checkpoint(
        self,
        output_name: str,
        state_dict: dict[str, Any],
        checkpoint_tag: str,
        model_config: ModelBaseConfig | None = None,
        **extra: Any,
    ) -> None:
        """Save a checkpoint to disk.

        Args:
            output_name: Output name of the checkpoint (including an extension).
            state_dict: Model state dict to save.
            checkpoint_tag: Checkpoint tag, for example "latest" or "E10_U200_S800".
            model_config: Model configuration. Defaults to None.
            **extra: further plain values stored in the checkpoint dict.

        Raises:
            RuntimeError: in case of an unexpected error while parsing model_config.
        """
        validate_output_name(output_name)
        validate_tag(checkpoint_tag)
        payload = self._model_payload(state_dict, checkpoint_tag, model_config, extra)
        parsed = parse_checkpoint_filename(output_name)
        sharded = any(type(t).__name__ == "DTensor" for t in state_dict.values())
        if sharded != (parsed is not None and parsed.is_sharded):
            raise ValueError(
                f"{output_name}: a state dict of DTensors (a sharded model) is saved as a sharded "
                "checkpoint folder named ..._model.dcp, and only such a state dict is; name it "
                "with checkpoint_filename(..., fmt='dcp')"
                if sharded
                else f"{output_name} names a sharded checkpoint folder but the state dict holds no DTensors"
            )
        pending = PendingFile(
            filename=output_name,
            payload=payload,
            fmt=SHARDED_FORMAT if sharded else format_of_path(output_name),
            role=parsed.role if parsed else "model",
            group=parsed.group if parsed else None,
            tag=parsed.tag if parsed else None,
            training_iteration=payload[CheckpointKeys.TRAINING_ITERATION],
        )
        if sharded or is_rank0():  # a sharded state: every rank calls this and writes its shards
            with gc_paused():
                self._submit([pending])

    def save(
        self,
        model: ModelBase,
        checkpoint_tag: str,
        trainer: SupportsStateDict | None = None,
        save_weights: bool = True,
        save_optim: bool = True,
        save_latest_weights: bool = False,
        save_latest_optim: bool = False,
        model_names_to_save: list[str] | None = None,
        save_frozen_weights: bool = True,
        *,
        metrics: dict[str, float] | None = None,
    ) -> None:
        """Saves a model to the disk.

        Args:
            model: Model to save.
            checkpoint_tag: Checkpoint tag, for example "latest" or "E10_U200_S800".
            trainer: If defined, also stores the state_dict of the trainer (and callbacks).
            save_weights: If true, stores model weights.
            save_optim: If true, stores optimizer states.
            save_latest_weights: If true, also stores the weights with the checkpoint identifier
                "latest". This file will be repeatedly overwritten throughout a training procedure.
            save_latest_optim: If true, also stores the optimizer states with the checkpoint
                identifier "latest". This file will be repeatedly overwritten throughout a training
                procedure.
            model_names_to_save: If defined, only store some of the submodels of a CompositeModel.
            save_frozen_weights: If true, also stores the weights of frozen models.
            metrics: values to record in the manifest of every set this save writes (e.g. the
                latest validation loss), for retention's `keep_best`; non-finite ones are left out.
        """
        spec = SaveSpec(
            save_weights=save_weights,
            save_optim=save_optim,
            save_latest_weights=save_latest_weights,
            save_latest_optim=save_latest_optim,
            model_names_to_save=model_names_to_save,  # type: ignore[arg-type]  # SaveSpec checks it
            save_frozen_weights=save_frozen_weights,
        )
        self.save_spec(model, checkpoint_tag, spec, trainer, metrics=metrics)

    def save_spec(
        self,
        model: ModelBase,
        checkpoint_tag: str,
        spec: SaveSpec,
        trainer: SupportsStateDict | None = None,
        *,
        metrics: dict[str, float] | None = None,
    ) -> None:
        """`save` with its options as one `SaveSpec` (what the trainer and callbacks pass).

        Files with the same content under several tags (a leaf's optimizer state, the trainer
        state) share one payload, so their bytes are written once (hard links on local disk)."""
        require_ksuit_model(model)
        validate_tag(checkpoint_tag)
        recorded = check_metrics(metrics)
        if trainer is not None and not callable(getattr(trainer, "state_dict", None)):
            raise TypeError(f"trainer must have a state_dict() method, got {type(trainer).__name__}")
        leaves = select_leaves(model, spec.model_names_to_save)
        with gc_paused():
            # every rank takes part: trainer.state_dict() may gather RNG states collectively
            trainer_state = trainer.state_dict() if trainer is not None else None
            if trainer_state is not None:
                check_state_dict(trainer_state, where="trainer.state_dict()")
            # sharded leaves are written by every rank; the rest by rank 0 alone
            spread = self.spread_replicated and distributed.world_size() > 1
            sharded = {name for name, leaf in leaves if spread or is_sharded(leaf)}
            if not sharded and not is_rank0():
                return
            files = self._files(model, leaves, checkpoint_tag, spec, trainer_state, sharded)
            if recorded is not None:
                for f in files:
                    f.metrics = recorded
            self._submit(files)

    def _files(
        self,
        model: ModelBase,
        leaves: list[tuple[str, Any]],
        checkpoint_tag: str,
        spec: SaveSpec,
        trainer_state: dict[str, Any] | None,
        sharded: set[str],
    ) -> list[PendingFile]:
        """The files of one save (on this rank: every rank writes the `sharded` leaves, rank 0
        the rest). A leaf's weights and optimizer state are taken once, also when two tags (a
        progress tag and `latest`) get them."""
        iteration = dict(self.update_counter.cur_iteration)
        weights: dict[str, dict[str, Any]] = {}
        optims: dict[str, dict[str, Any]] = {}
        files: list[PendingFile] = []
        for plan in spec.plan(checkpoint_tag, with_trainer=trainer_state is not None):
            tag = plan.tag
            for name, leaf in leaves:
                fmt = SHARDED_FORMAT if name in sharded else self.format
                if name not in sharded and not is_rank0():
                    continue
                if plan.weights and (spec.save_frozen_weights or not leaf.is_frozen):
                    state_dict = weights.get(name)
                    if state_dict is None:
                        state_dict = weights[name] = leaf.state_dict()
                    payload = self._model_payload(state_dict, tag, leaf.model_config, {})
                    filename = checkpoint_filename(name, tag, "model", fmt=fmt)
                    files.append(PendingFile(filename, payload, fmt, "model", model.name, tag, iteration))
                if plan.optim and leaf.optimizer is not None:
                    optim_fmt = SHARDED_FORMAT if name in sharded else "torch"
                    filename = checkpoint_filename(name, tag, "optim", fmt=optim_fmt)
                    optim_state = optims.get(name)
                    if optim_state is None:
                        optim_state = optims[name] = leaf.optimizer.state_dict()
                    files.append(
                        PendingFile(filename, optim_state, optim_fmt, "optim", model.name, tag, iteration)
                    )
            if not is_rank0():
                continue
            if plan.trainer and trainer_state is not None:
                filename = checkpoint_filename(model.name, tag, "trainer")
                files.append(
                    PendingFile(filename, trainer_state, "torch", "trainer", model.name, tag, iteration)
                )
        return files

    def prepare(self, model: ModelBase) -> None:
        """Readies the snapshot memory of asynchronous saves of `model` before the first save, off
        the caller's thread, so the first save stalls training no longer than later ones.

        Maps host memory for the weights, optimizer states (estimated where an optimizer has not
        stepped yet: `ksuit.writers.sizing`) and trainer state of every leaf, `max_pending` times
        (what as many saves take anyway), and touches it in a background thread; returns at once.
        A save before that is done waits only for the part it needs that is not ready yet. Does
        nothing for synchronous saving, on ranks other than 0, and for a model with sharded leaves
        (every rank snapshots its own shards). The trainer calls it at set-up.
        """
        require_ksuit_model(model)
        if not self.async_save or not is_rank0():
            return
        if any(is_sharded(leaf) for _, leaf in select_leaves(model, None)):
            return
        nbytes, cuda = snapshot_nbytes(model)
        sink = self._set_sink()
        assert isinstance(sink, AsyncSetWriter)
        sink.prepare(nbytes, pinned=cuda)

    @contextlib.contextmanager
    def batch(self, metrics: dict[str, float] | None = None) -> Iterator[CheckpointWriter]:
        """Collects every save made inside the block into ONE atomic set switch.

        Use it when files of several saves belong together, e.g. the trainer's `latest` and the
        EMA weights written for the same update: a crash then leaves all of them old or all new.
        Payloads are taken when the block ends (snapshotted then in async mode), so do not
        change the saved tensors inside the block. An exception inside the block writes nothing.
        Nested blocks join the outermost one; an exception leaving a nested block drops that
        block's saves (an outer block that catches it writes only its own). `metrics` (of the
        outermost block) are recorded in the manifest of every set saved inside without its own.
        """
        if self._batch is not None:
            mark = len(self._batch)
            try:
                yield self
            except BaseException:
                del self._batch[mark:]
                raise
            return
        self._batch = []
        self._batch_metrics = check_metrics(metrics)
        try:
            yield self
        except BaseException:
            self._batch = None
            raise
        finally:
            batch_metrics, self._batch_metrics = self._batch_metrics, None
        files, self._batch = self._batch, None
        if batch_metrics is not None:
            for f in files:
                if f.metrics is None:
                    f.metrics = batch_metrics
        # a file saved twice in one batch (e.g. 'latest' by two callbacks) is written once, last wins
        unique = {f.filename: f for f in files}
        with gc_paused():
            self._submit(list(unique.values()))

    def flush(self) -> None:
        """Blocks until every pending asynchronous save is on disk; re-raises a failed one."""
        if self._sink is not None:
            self._sink.flush()

    def close(self) -> None:
        """Flushes and stops the background writer (a later save starts a new one)."""
        if self._sink is not None:
            sink, self._sink = self._sink, None
            try:
                sink.close()
            finally:
                self._past_failures += _failures_of(sink)

    @property
    def retention(self) -> RetentionPolicy | None:
        """The policy applied around every save (None: every set is kept)."""
        return self._retention.policy if self._retention is not None else None

    def free_bytes(self) -> int | None:
        """Free bytes of the disk the checkpoint folder is (or will be) on; None if unknown."""
        return open_backend(self.path_provider.checkpoint_path).free_bytes()

    @property
    def snapshot_pool(self) -> SnapshotPool | None:
        """The snapshot buffers of the asynchronous writer (None before its first save and for
        synchronous saving): how much host memory async saving holds."""
        return self._sink.pool if isinstance(self._sink, AsyncSetWriter) else None

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals --------------------------------------------------------------------------
    def _model_payload(
        self,
        state_dict: dict[str, Any],
        checkpoint_tag: str,
        model_config: ModelBaseConfig | None,
        extra: dict[str, Any],
    ) -> dict[str, Any]:
        return model_payload(
            state_dict,
            checkpoint_tag,
            dict(self.update_counter.cur_iteration),
            self.path_provider.run_id,
            model_config,
            extra,
        )

    @property
    def mirror_location(self) -> Path | str | None:
        """The checkpoint folder of the mirror (None without one)."""
        if self.mirror is None:
            return None
        from ksuit.providers import PathProvider

        pp = self.path_provider
        return PathProvider(self.mirror, pp.run_id, getattr(pp, "stage_name", None)).checkpoint_path

    @property
    def mirror_failures(self) -> list[ReplicationFailure]:
        """Sets that could not be replicated to the mirror (each also logged as an error)."""
        return self._past_failures + (_failures_of(self._sink) if self._sink is not None else [])

    def _set_sink(self) -> SetSink:
        """The set writer of the run's checkpoint folder: synchronous, or asynchronous around it
        (chosen once; a new one when the folder changed)."""
        location = self.path_provider.checkpoint_path
        if self._sink is not None and self._sink.backend.location != str(location):
            self.close()
        if self._sink is None:
            options = getattr(self.path_provider, "storage_options", None)
            if options:
                set_storage_options(str(self.path_provider.output_root_path), options)
            mirror = self.mirror_location
            writer = (
                SetWriter(open_backend(location), hooks=self._retention)
                if mirror is None
                else MirroringSetWriter(open_backend(location), mirror, hooks=self._retention)
            )
            self._sink = AsyncSetWriter(writer, self.max_pending) if self.async_save else writer
        return self._sink

    def _submit(self, files: list[PendingFile]) -> None:
        if not files:
            return
        if self._batch is not None:
            self._batch.extend(files)
            return
        sink = self._set_sink()
        if self.async_save and any(f.fmt == SHARDED_FORMAT for f in files):
            # the background thread's collectives need a process group of their own; every rank
            # reaches its first sharded save here, so all of them create it together
            writer = sink.set_writer if isinstance(sink, AsyncSetWriter) else sink
            assert isinstance(writer, SetWriter)
            writer.group = sharded_group()
        # retention leaves the sets of a queued save alone until it is written
        queued = self._retention if isinstance(sink, AsyncSetWriter) else None
        if queued is not None:
            queued.submitted(files)
        try:
            sink.write_set(files, self.path_provider.run_id, on_written=self._log_written)
        except BaseException:
            if queued is not None:  # an asynchronous save fails before it is queued
                queued.released(files)
            raise

    def _log_written(self, written: list[WrittenFile]) -> None:
        for w in written:
            if w.shared_with is not None:
                self.logger.info(
                    "wrote %s (%s bytes, the bytes of %s: hard link)", w.location, w.size, w.shared_with
                )
            else:
                self.logger.info("wrote %s (%s bytes, %.3fs)", w.location, w.size, w.seconds)


def _failures_of(sink: SetSink) -> list[ReplicationFailure]:
    writer = sink.set_writer if isinstance(sink, AsyncSetWriter) else sink
    return list(writer.failures) if isinstance(writer, MirroringSetWriter) else []
