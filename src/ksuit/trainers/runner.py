"""From a validated `RunConfig` to a trained model: builds the model, data, callbacks, trainer
and initializer, sets up torch.distributed under torchrun, and runs `fit`.

`prepare_run` does every check that can fail (config, paths, resume set) before training starts;
`ksuit train` is a thin shell around it.
"""

from __future__ import annotations

import logging
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from torch.utils.data import Dataset

from ksuit.callbacks import CALLBACK_KINDS, Callback
from ksuit.data import DATASET_KINDS
from ksuit.initializers import INITIALIZER_KINDS, Initializer, ResumeInitializer
from ksuit.models.base import Model, ModelBase
from ksuit.providers import PathProvider
from ksuit.readers import list_checkpoints
from ksuit.schemas.models import ModelBaseConfig, OptimizerConfig
from ksuit.schemas.run import (
    ConfigError,
    RunConfig,
    format_validation_error,
    validate_kwargs,
)
from ksuit.storage import Backend, open_backend
from ksuit.storage.backend import WriteStream
from ksuit.trainers.base import BaseTrainer
from ksuit.trainers.rng import seed_everything
from ksuit.utils import distributed
from ksuit.utils.imports import resolve_import_path

logger = logging.getLogger(__name__)
CONFIG_NAME = "config.yaml"
MAX_CONFIG_BYTES = 16 << 20


@dataclass
class PreparedRun:
    config: RunConfig
    path_provider: PathProvider
    model: ModelBase
    trainer: BaseTrainer
    datasets: dict[str, Dataset[Any]]
    initializer: Initializer | None = None
    notes: list[str] = field(default_factory=list)

    mirror_dir: Path | str | None = None  # the run folder of the mirror (trainer.checkpoint_mirror)

    @property
    def run_dir(self) -> Path | str:
        return self.path_provider.run_output_path


def _resolve(
    config: RunConfig, kind: str, where: str, short: Mapping[str, Any], base: type | None = None
) -> Any:
    if kind in short:
        return short[kind]
    if "." not in kind:
        raise config.error(
            f"{where}.kind", f"unknown kind '{kind}'; use one of {', '.join(short)} or an import path"
        )
    try:
        target = resolve_import_path(kind, what=f"{where}.kind")
    except (ImportError, ValueError) as e:
        raise config.error(f"{where}.kind", str(e)) from None
    if base is not None and not (isinstance(target, type) and issubclass(target, base)):
        raise config.error(
            f"{where}.kind", f"'{kind}' is not a {base.__module__}.{base.__qualname__} subclass"
        )
    return target


# ---- model ----------------------------------------------------------------------------------------


def model_config_class(model_cls: type[ModelBase]) -> type[ModelBaseConfig]:
    """The config class a model takes: the annotation of its `model_config` argument."""
    try:
        hint = typing.get_type_hints(model_cls.__init__).get("model_config")
    except Exception:
        hint = None
    if isinstance(hint, type) and issubclass(hint, ModelBaseConfig):
        return hint
    raise TypeError(
        f"cannot tell the config class of {model_cls.__qualname__}: annotate __init__'s model_config with a "
        "ModelBaseConfig subclass, or give model.config_kind in the run config"
    )


def with_default_optimizer(config: ModelBaseConfig, optimizer: OptimizerConfig) -> ModelBaseConfig:
    """`config` with `optimizer` set on every leaf model config that has none (nested configs too)."""
    updates: dict[str, Any] = {}
    for name in type(config).model_fields:
        value = getattr(config, name)
        if isinstance(value, ModelBaseConfig):
            new = with_default_optimizer(value, optimizer)
            if new is not value:
                updates[name] = new
    model_cls = resolve_import_path(config.kind, what="model kind")
    if isinstance(model_cls, type) and issubclass(model_cls, Model) and config.optimizer_config is None:
        updates["optimizer_config"] = optimizer
    return config.model_copy(update=updates) if updates else config


def build_model(config: RunConfig) -> ModelBase:
    section = config.model.kwargs
    config_kind = section.pop("config_kind", None)
    model_cls = _resolve(config, config.model.kind, "model", {}, ModelBase)
    if config_kind is not None:
        config_cls = _resolve(config, config_kind, "model.config_kind", {}, ModelBaseConfig)
    else:
        try:
            config_cls = model_config_class(model_cls)
        except TypeError as e:
            raise config.error("model.kind", str(e)) from None
    try:
        model_config = config_cls.model_validate({"kind": config.model.kind, **section})
    except ValidationError as e:
        raise format_validation_error(
            e, config.source, config.override_paths, config_cls, prefix="model"
        ) from None
    if config.optimizer is not None:
        optim_cls = _resolve(config, config.optimizer.kind, "optimizer", {})
        validate_kwargs(optim_cls, config.optimizer.kwargs, "optimizer", config, skip=("params",))
        model_config = with_default_optimizer(model_config, config.optimizer)
    model: ModelBase = model_cls(model_config=model_config)
    return model


# ---- data, callbacks, initializers ----------------------------------------------------------------


def build_datasets(config: RunConfig) -> dict[str, Dataset[Any]]:
    builder = _resolve(config, config.data.kind, "data", DATASET_KINDS)
    kwargs = validate_kwargs(builder, config.data.kwargs, "data", config)
    datasets = builder(**kwargs)
    if not isinstance(datasets, dict) or "train" not in datasets:
        raise config.error("data.kind", f"'{config.data.kind}' must return a dict of datasets with 'train'")
    return datasets


def _build_each(config: RunConfig, section_name: str, kinds: Mapping[str, type], base: type) -> list[Any]:
    """One instance per item of a list section (`callbacks`, `initializers`), errors naming the item."""
    result = []
    for i, section in enumerate(getattr(config, section_name)):
        where = f"{section_name}.{i}"
        cls = _resolve(config, section.kind, where, kinds, base)
        kwargs = validate_kwargs(cls, section.kwargs, where, config)
        try:
            result.append(cls(**kwargs))
        except (TypeError, ValueError) as e:
            raise config.error(where, str(e)) from None
    return result


def build_callbacks(config: RunConfig) -> list[Callback]:
    return _build_each(config, "callbacks", CALLBACK_KINDS, Callback)


def build_initializers(config: RunConfig) -> list[Initializer]:
    return _build_each(config, "initializers", INITIALIZER_KINDS, Initializer)


class _Chain(Initializer):
    def __init__(self, initializers: list[Initializer]):
        self.initializers = initializers

    def apply(self, trainer: BaseTrainer) -> None:
        for initializer in self.initializers:
            initializer.apply(trainer)


# ---- the run --------------------------------------------------------------------------------------


def has_checkpoints(run_dir: Path | str | None) -> bool:
    """Whether the run folder holds checkpoints (a store that cannot be reached fails here,
    before training: missing credentials, no such bucket, access denied)."""
    if run_dir is None:
        return False
    try:
        return bool(list_checkpoints(run_dir))
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return False


def prepare_run(
    config: RunConfig,
    output: str | Path,
    run_id: str | None = None,
    resume: bool = False,
    resume_from: str | None = None,
    progress: bool = False,
) -> PreparedRun:
    """Builds everything a run needs and checks what can be checked before training.

    `resume` continues `run_id` in place from `resume_from` (a tag or spec; None: the newest
    usable checkpoint). Under torchrun the process group is initialized here.
    """
    tc = config.trainer
    trainer_cls = _resolve(config, tc.kind, "trainer", {}, BaseTrainer)
    if trainer_cls.loss is BaseTrainer.loss:
        raise config.error(
            "trainer.kind",
            f"{trainer_cls.__qualname__} does not override loss(model, batch); name a subclass that does, "
            "e.g. ksuit.trainers.reconstruction.ReconstructionTrainer",
        )
    device_type = "cuda" if tc.device == "cuda" or (tc.device == "auto" and _cuda()) else "cpu"
    distributed.init_from_env(device_type)
    if resume and run_id is None:
        raise ConfigError("--resume continues an existing run: give its --run-id")
    if run_id is None:
        run_id = distributed.broadcast_object(PathProvider.generate_run_id())
    path_provider = PathProvider(output, run_id)
    run_dir = path_provider.run_output_path
    mirror_dir = (
        None if tc.checkpoint_mirror is None else PathProvider(tc.checkpoint_mirror, run_id).run_output_path
    )
    notes: list[str] = []
    where = f"{run_dir}" + (f" or its mirror {mirror_dir}" if mirror_dir is not None else "")
    if resume:
        if not has_checkpoints(run_dir) and not has_checkpoints(mirror_dir):
            raise FileNotFoundError(
                f"cannot resume: {where} has no checkpoints (check --output and --run-id)"
            )
    elif has_checkpoints(run_dir) or has_checkpoints(mirror_dir):
        raise FileExistsError(
            f"run {where} already has checkpoints; continue it with --resume, or choose another --run-id"
        )

    seed_everything(tc.seed)  # the model's initial weights follow from the seed
    model = build_model(config)
    datasets = build_datasets(config)
    callbacks = build_callbacks(config)
    initializers = build_initializers(config)
    trainer_kwargs = tc.model_dump(exclude={"kind"})
    trainer = trainer_cls(path_provider, callbacks=callbacks, progress=progress, **trainer_kwargs)
    if config.retention is not None:
        given = [i for i, cb in enumerate(config.callbacks) if cb.kwargs.get("retention") is not None]
        if given:
            raise config.error(
                f"callbacks.{given[0]}.retention",
                "retention is also set at the top level; it governs the run's whole checkpoint folder: "
                "set it once",
            )
        trainer.retention = config.retention

    initializer: Initializer | None
    if resume:
        if initializers:
            notes.append(
                "resuming: the config's initializers are skipped (the weights come from the checkpoint)"
            )
        initializer = ResumeInitializer(run_dir, resume_from, mirror=mirror_dir)
    else:
        initializer = _Chain(initializers) if initializers else None
    return PreparedRun(config, path_provider, model, trainer, datasets, initializer, notes, mirror_dir)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}{key}.").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in _flatten(item, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): value}


def record_config(prepared: PreparedRun) -> Path | str | None:
    """Saves the resolved config as `<run>/config.yaml` when a run starts (rank 0); when it is
    resumed, warns about every key that differs from the saved one. The run folder may be a URL."""
    if not distributed.is_rank0():
        return None
    folder = open_backend(prepared.run_dir)
    where = folder.file_location(CONFIG_NAME)
    data = prepared.config.model_dump(mode="json", exclude_none=True)
    saved = _saved_config(folder)
    if saved is not None:
        before = _flatten(yaml.safe_load(saved) or {})
        now = _flatten(data)
        changed = [
            f"{k}: {before.get(k, '(unset)')} -> {now.get(k, '(unset)')}"
            for k in sorted(set(before) | set(now))
            if before.get(k) != now.get(k)
        ]
        if changed:
            logger.warning(
                "the config differs from the one this run started with (%s): %s", where, "; ".join(changed)
            )
        return None
    text = yaml.safe_dump(data, sort_keys=False).encode()

    def write(out: WriteStream) -> None:
        out.write(text)

    folder.write_file(CONFIG_NAME, write, len(text))
    return folder.file_ref(CONFIG_NAME)


def _saved_config(folder: Backend) -> bytes | None:
    try:
        if folder.exists_as() != "folder" or not any(e.name == CONFIG_NAME for e in folder.entries()):
            return None
        return folder.read_small(CONFIG_NAME, MAX_CONFIG_BYTES, "run config")
    except FileNotFoundError:
        return None


def run(prepared: PreparedRun) -> ModelBase:
    """Trains; raises `TrainingInterrupted` after saving `latest` on SIGTERM/SIGINT."""
    for note in prepared.notes:
        logger.info(note)
    record_config(prepared)
    datasets = {k: v for k, v in prepared.datasets.items() if k != "train"}
    return prepared.trainer.fit(
        prepared.model, prepared.datasets["train"], datasets=datasets, initializer=prepared.initializer
    )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
