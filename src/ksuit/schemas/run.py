"""The YAML run config: model, optimizer, data, trainer, callbacks, initializers.

    model:        {kind: <model class path>, <fields of its config class>}
    optimizer:    {kind: torch.optim.AdamW, lr: 1.0e-3, ...}   default for leaves without one
    data:         {kind: digits | synthetic | <function path>, <its arguments>}
    trainer:      {kind: <BaseTrainer subclass path>, max_epochs: 20, effective_batch_size: 64, ...}
    callbacks:    [{kind: checkpoint | best_checkpoint | ema | validation_loss | <class path>, ...}]
    initializers: [{kind: previous_run | <class path>, ...}]
    retention:    {keep_last: 2, keep_every_epochs: 10, max_bytes: 20GiB, ...}   (optional)

Every mistake is a `ConfigError` naming the file, the key and, for command-line overrides
(`trainer.max_epochs=5`, `callbacks.0.every_n_epochs=2`), the override that set it.
"""

from __future__ import annotations

import difflib
import inspect
import re
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from ksuit.schemas.models import OptimizerConfig
from ksuit.schemas.retention import RetentionPolicy
from ksuit.schemas.trainer import TrainerSettings


class ConfigError(ValueError):
    """A run config that cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KindConfig(BaseModel):
    """`kind` plus the arguments of what it names (checked against its signature when built)."""

    model_config = ConfigDict(extra="allow")

    kind: str

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class _TrainerKind(_Strict):
    kind: str = "ksuit.trainers.BaseTrainer"


class TrainerConfig(TrainerSettings, _TrainerKind):
    """The `trainer:` section: the trainer class (`kind`, listed first) and its settings,
    validated by the same model as `BaseTrainer`'s arguments."""


class RunConfig(_Strict):
    model: KindConfig
    optimizer: OptimizerConfig | None = None
    data: KindConfig = KindConfig(kind="digits")
    trainer: TrainerConfig
    callbacks: list[KindConfig] = []
    initializers: list[KindConfig] = []
    retention: RetentionPolicy | None = None
    """Which checkpoint sets the run keeps and its disk budget (or `retention:` on one checkpoint
    callback)."""
    source: str = Field(default="<config>", exclude=True)
    override_paths: dict[str, str] = Field(default_factory=dict, exclude=True)

    def error(self, loc: str, message: str) -> ConfigError:
        """A ConfigError for key `loc` (dotted), naming the file or the override that set it."""
        return ConfigError(f"{self.source}: {loc}: {message}{_override_note(loc, self.override_paths)}")


# ---- YAML ---------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (YAML 1.2), as people write learning rates."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str = "<yaml>") -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None


# ---- overrides ----------------------------------------------------------------------------------


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str = "<config>") -> dict[str, str]:
    """Applies `a.b.c=value` overrides to `raw` in place (list items by index: `callbacks.0.x=1`);
    values are YAML (`5`, `1.0e-3`, `true`, `[encoder]`). Returns `{dotted path: override}`."""
    applied: dict[str, str] = {}
    for override in overrides:
        key, sep, text = override.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {override!r} is not KEY=VALUE (e.g. trainer.max_epochs=5)")
        parts = key.split(".")
        value = parse_yaml(text, source=f"override {override!r}")
        node: Any = raw
        for depth, part in enumerate(parts[:-1]):
            node = _child(node, part, parts[: depth + 1], override, create=True)
        _set(node, parts[-1], value, override)
        applied[key] = override
    return applied


def _child(node: Any, part: str, path: list[str], override: str, create: bool) -> Any:
    where = ".".join(path)
    if isinstance(node, list):
        index = _index(node, part, where, override)
        return node[index]
    if isinstance(node, dict):
        if part not in node or node[part] is None:
            node[part] = {}
        return node[part]
    raise ConfigError(
        f"override {override!r}: '{where}' goes into a {type(node).__name__}, not a mapping or list"
    )


def _index(node: list[Any], part: str, where: str, override: str) -> int:
    if not part.lstrip("-").isdigit():
        raise ConfigError(
            f"override {override!r}: '{where}' indexes a list; use a number (e.g. callbacks.0.kind)"
        )
    index = int(part)
    if not -len(node) <= index < len(node):
        raise ConfigError(
            f"override {override!r}: '{where}' is out of range (the list has {len(node)} items)"
        )
    return index


def _set(node: Any, part: str, value: Any, override: str) -> None:
    if isinstance(node, list):
        node[_index(node, part, part, override)] = value
    elif isinstance(node, dict):
        node[part] = value
    else:
        raise ConfigError(f"override {override!r}: cannot set '{part}' inside a {type(node).__name__}")


def _override_note(loc: str, override_paths: dict[str, str]) -> str:
    for path, override in override_paths.items():
        if loc == path or loc.startswith(path + ".") or path.startswith(loc + "."):
            return f" (set by the command-line override {override!r})"
    return ""


# ---- loading ------------------------------------------------------------------------------------


def format_validation_error(
    error: ValidationError,
    source: str,
    override_paths: dict[str, str],
    model: type[BaseModel] | None = None,
    prefix: str = "",
) -> ConfigError:
    lines = []
    for err in error.errors():
        loc = ".".join(str(p) for p in (prefix.split(".") if prefix else []) + list(err["loc"]))
        if err["type"] == "extra_forbidden":
            key = str(err["loc"][-1])
            known = _known_keys(model, err["loc"][:-1])
            hint = _suggest(key, known)
            message = f"unknown key '{key}'{hint}"
            if known:
                message += f" (known: {', '.join(known)})"
        elif err["type"] == "missing":
            message = "missing required key"
        elif err["type"] == "value_error":  # a validator's own message, which names the values
            message = str(err["ctx"]["error"])
        else:
            message = f"{err['msg']} (got {err.get('input')!r})"
        lines.append(f"{source}: {loc}: {message}{_override_note(loc, override_paths)}")
    return ConfigError("\n".join(lines))


def _known_keys(model: type[BaseModel] | None, loc: tuple[int | str, ...]) -> list[str]:
    """Field names of the pydantic model at `loc` inside `model` (following nested models and lists)."""
    current: Any = model
    for part in loc:
        if current is None:
            return []
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = _model_in(field.annotation)
    return (
        sorted(k for k, f in getattr(current, "model_fields", {}).items() if not f.exclude) if current else []
    )


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def load_run_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Reads, overrides and validates a run config file; errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    raw = parse_yaml(path.read_text(), source=str(path))
    return run_config_from_dict(raw, overrides, source=str(path))


def run_config_from_dict(raw: Any, overrides: Sequence[str] = (), source: str = "<config>") -> RunConfig:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: a run config is a mapping with model, data, trainer, ...; got {type(raw).__name__}"
        )
    applied = apply_overrides(raw, list(overrides), source)
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise format_validation_error(e, source, applied, RunConfig) from None
    config.source = source
    config.override_paths = applied
    return config


# ---- arguments of what a `kind` names -------------------------------------------------------------


def signature_model(target: Any, skip: tuple[str, ...] = ()) -> type[BaseModel]:
    """A pydantic model of `target`'s keyword arguments (a class's `__init__`), extra keys forbidden."""
    func = target.__init__ if inspect.isclass(target) else target
    try:
        hints = typing.get_type_hints(func)
    except Exception:  # unresolvable annotations: accept any value for them
        hints = {}
    fields: dict[str, Any] = {}
    for name, param in inspect.signature(func).parameters.items():
        if name in ("self", *skip) or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        annotation = hints.get(name, Any)
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[name] = (annotation, default)
    name = getattr(target, "__name__", "Arguments")
    return create_model(
        f"{name}Arguments", __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=True), **fields
    )


def validate_kwargs(
    target: Any, kwargs: dict[str, Any], where: str, config: RunConfig, skip: tuple[str, ...] = ()
) -> dict[str, Any]:
    """`kwargs` checked (and coerced) against `target`'s signature; errors name `where` (e.g.
    `callbacks.1`) in the config's file."""
    model = signature_model(target, skip)
    try:
        validated = model.model_validate(kwargs)
    except ValidationError as e:
        raise format_validation_error(e, config.source, config.override_paths, model, prefix=where) from None
    return {k: getattr(validated, k) for k in kwargs}
