"""`TrainerSettings`: every setting of a trainer, with its type, default and constraint, once.

`BaseTrainer(path_provider, effective_batch_size=..., ...)` validates its keyword arguments
through this model, and the run config's `trainer:` section (`ksuit.schemas.run.TrainerConfig`)
is this model plus `kind`, so the Python API and the YAML file cannot disagree on a rule.

Counts (`effective_batch_size`, `max_epochs`, ...) are strict ints: `True`, `8.0` or `"8"` are
refused rather than silently converted. What is not a setting of the run stays out: the path
provider and the callbacks are objects, and the progress bar is a display choice of the process
that launches training (a run resumes the same with or without it).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ksuit.utils.training import TrainingIteration

Count = Annotated[int, Field(gt=0, strict=True)]
"""A positive int (bools, floats and strings refused)."""

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["float32", "bfloat16", "float16"]
CheckpointFormat = Literal["torch", "safetensors"]
Strategy = Literal["ddp", "fsdp"]

END_FIELDS = {"max_epochs": "epoch", "max_updates": "update", "max_samples": "sample"}


class TrainerSettings(BaseModel):
    """The settings of a trainer (the keyword arguments of `BaseTrainer` besides the path
    provider, the callbacks and `progress`).

    The data order is reproducible: the last partial batch of an epoch is dropped, so every
    epoch has exactly `updates_per_epoch` updates and a tag such as `E3_U70_S4480` says how far
    into an epoch a checkpoint was taken.
    """

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    max_epochs: Count | None = None
    """Train this many epochs. Give exactly one of `max_epochs`, `max_updates`, `max_samples`."""
    max_updates: Count | None = None
    """Train this many optimizer updates."""
    max_samples: Count | None = None
    """Train until this many samples were seen (rounded up to whole updates)."""
    effective_batch_size: Count
    """Samples per optimizer update, over all processes and accumulation steps. Each process
    draws `effective_batch_size / (world_size * accumulation_steps)` samples per forward pass;
    it must divide exactly."""
    accumulation_steps: Count = 1
    """Forward/backward passes per update (gradient accumulation)."""
    device: Device = "auto"
    """"auto" (CUDA when available), "cpu" or "cuda". Under torchrun each process uses
    `cuda:<LOCAL_RANK>`."""
    precision: Precision = "float32"
    """"float32", "bfloat16" (autocast) or "float16" (autocast and a GradScaler)."""
    seed: int = 0
    """Seeds the global generators (plus the rank) and the data order (epoch `e` uses a
    permutation drawn with `seed + e`)."""
    num_workers: Annotated[int, Field(ge=0, strict=True)] = 0
    """DataLoader workers. With 0 a resumed run is bitwise equal to an uninterrupted one; with
    workers it is too unless the dataset itself draws random numbers (augmentations), whose
    worker seeds depend on the batch order."""
    num_threads: Count | None = None
    """Torch CPU threads during `fit` (default: torch's choice). Small models train fastest on
    one; a resumed run must use the same number to be bitwise equal."""
    clip_grad_norm: float | None = Field(default=None, gt=0)
    """Clip the gradient norm of all trainable parameters to this value."""
    async_save: bool = False
    """Write checkpoints in the background (`CheckpointWriter(async_save=...)`)."""
    checkpoint_format: CheckpointFormat = "torch"
    """File format of weights: "torch" (`.th`) or "safetensors" (`CheckpointWriter(format=...)`)."""
    strategy: Strategy = "ddp"
    """How several processes (torchrun) share the model: "ddp" replicates it (DistributedDataParallel;
    rank 0 writes `.th` files), "fsdp" shards every leaf model's parameters and optimizer state
    over the ranks (FSDP2 `fully_shard`; every rank writes its shards of a sharded checkpoint
    folder `.dcp`, loaded resharded on any number of processes). Alone in one process, both
    train the plain model."""
    checkpoint_mirror: Annotated[str, Field(min_length=1)] | None = None
    """An output root (e.g. `s3://bucket/runs`) to replicate every committed checkpoint set to in
    the background (`CheckpointWriter(mirror=...)`): saves run at local speed, and `--resume`
    takes the newest complete set from either copy, so a new machine resumes from the mirror."""

    @model_validator(mode="after")
    def _exactly_one_end(self) -> TrainerSettings:
        given = [name for name in END_FIELDS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of max_epochs, max_updates, max_samples "
                f"(given: {', '.join(given) or 'none'})"
            )
        return self

    @property
    def end_iteration(self) -> TrainingIteration:
        """Where training ends, e.g. `TrainingIteration(epoch=20)`."""
        ends = {unit: getattr(self, name) for name, unit in END_FIELDS.items()}
        return TrainingIteration(**{unit: value for unit, value in ends.items() if value is not None})

    @classmethod
    def from_arguments(cls, **arguments: Any) -> TrainerSettings:
        """The validated settings, or a ValueError naming every wrong argument and its value."""
        try:
            return cls.model_validate(arguments)
        except ValidationError as e:
            raise ValueError(describe_errors(e)) from None


def describe_errors(error: ValidationError) -> str:
    """One line per problem: `<field>: <what is wrong> (got <value>)`."""
    lines = []
    for err in error.errors():
        where = ".".join(str(part) for part in err["loc"])
        if err["type"] == "value_error":  # a validator's own message names the values
            message = str(err["ctx"]["error"])
        else:
            message = f"{err['msg']} (got {err.get('input')!r})"
        lines.append(f"{where}: {message}" if where else message)
    return "; ".join(lines)
