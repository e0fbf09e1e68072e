"""Plain `torch.nn.Module`s as ksuit models: `wrap(module, name, optimizer=..., config=...)`.

A wrapped module is a ksuit `Model` (a `CompositeModel` for a dict of modules), so the
`CheckpointWriter`, `list_checkpoints`, `ksuit verify` and resume treat it like any other: one
weights file (and one optimizer file) per module, named `<name>_cp=<tag>_model.th` or
`<name>.<key>_cp=...` for a part of a composite. The weights file holds the module's own
`state_dict()` (its keys as if it were not wrapped) and records the module's class path and the
caller's settings (`config`) in `model_config`; that class path is information, never imported.
A plain module cannot be rebuilt from its file alone: load it into a module you built with
`ksuit.load_model(path, module=...)`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

from ksuit.models.base import CompositeModel, Model, ModelBase
from ksuit.models.optimizer import OptimizerWrapper
from ksuit.schemas.models import ModelBaseConfig
from ksuit.utils.imports import import_path

# the attribute the wrapped module lives under; its keys are mapped to the module's own keys
_INNER = "module"


class WrappedModuleConfig(ModelBaseConfig):
    """What a weights file of a wrapped plain module records about it."""

    kind: str = "ksuit.models.wrapped.WrappedModel"
    module_kind: str
    """`module.QualName` of the wrapped module's class (recorded for people; never imported)."""
    module_config: dict[str, Any] | None = None
    """The caller's own settings of the module (`wrap(..., config=...)`), as JSON values."""


class WrappedCompositeConfig(ModelBaseConfig):
    """The config of a dict of wrapped modules (its parts' files record their own configs)."""

    kind: str = "ksuit.models.wrapped.WrappedComposite"


def rebuild_error(source: str, module_kind: str | None) -> ValueError:
    """The error for a file of a wrapped module that someone tries to rebuild from the file alone."""
    what = f"a plain torch module ({module_kind})" if module_kind else "plain torch modules"
    return ValueError(
        f"{source} holds the weights of {what}, which a file cannot rebuild: only config-described "
        "ksuit Models (ksuit.models.Model) are rebuilt from a file alone. Build the module yourself and "
        "load into it: ksuit.load_model(path, module=YourModule(...))"
    )


def _sink_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """Inside a parent's `load_state_dict`: the module's own keys `<prefix>x` become the
    wrapper's `<prefix>module.x` (every key under the prefix moves down one level)."""
    module.__dict__["_load_prefix"] = prefix  # for _lift_incompatible, which is not told the prefix
    for key in [k for k in state_dict if k.startswith(prefix)]:
        state_dict[f"{prefix}{_INNER}.{key[len(prefix) :]}"] = state_dict.pop(key)


def _lift_incompatible(module: nn.Module, incompatible_keys: Any) -> None:
    """Missing and unexpected keys of the module reported with its own names (no `module.`)."""
    prefix = module.__dict__.pop("_load_prefix", None)
    if prefix is None:
        return
    inner = f"{prefix}{_INNER}."
    for keys in (incompatible_keys.missing_keys, incompatible_keys.unexpected_keys):
        keys[:] = [prefix + k[len(inner) :] if k.startswith(inner) else k for k in keys]


class WrappedModel(Model):
    """A plain module (and the optimizer the caller built for it) as a ksuit leaf model.

    `state_dict()` and `load_state_dict()` are the module's own, also inside a composite's, so
    a file loads into the bare module (`module.load_state_dict(payload["state_dict"])`).
    Build one with `ksuit.models.wrap`.
    """

    def __init__(
        self,
        model_config: WrappedModuleConfig,
        module: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ):
        if module is None:
            raise rebuild_error(f"model '{model_config.name}'", model_config.module_kind)
        super().__init__(model_config, **kwargs)
        self.module = module
        self.register_load_state_dict_pre_hook(_sink_keys)
        self.register_load_state_dict_post_hook(_lift_incompatible)
        if optimizer is not None:
            _check_optimizer_params(optimizer, module, model_config.name)
            self._optimizer = OptimizerWrapper.of(optimizer)
        self._is_initialized = True

    def initialize(self) -> WrappedModel:
        """Nothing to build: the caller built the module and its optimizer."""
        self._is_initialized = True
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        # nn.Module.state_dict recurses through this method, so a parent's state dict gets the
        # module's own keys (and metadata) under the wrapper's prefix too
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)


class WrappedComposite(CompositeModel):
    """A dict of wrapped modules: one file per part, `<name>.<key>_cp=...`."""

    def __init__(
        self,
        model_config: WrappedCompositeConfig,
        parts: Mapping[str, ModelBase] | None = None,
        **kwargs: Any,
    ):
        if parts is None:
            raise rebuild_error(f"model '{model_config.name}'", None)
        super().__init__(model_config, **kwargs)
        self._part_names = list(parts)
        for key, part in parts.items():
            self.add_module(key, part)
        self._is_initialized = True

    @property
    def submodels(self) -> dict[str, ModelBase | None]:
        return {key: getattr(self, key) for key in self._part_names}

    def initialize(self) -> WrappedComposite:
        return self


def wrap(
    module: nn.Module | Mapping[str, Any],
    name: str,
    optimizer: torch.optim.Optimizer | Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | BaseModel | None = None,
) -> ModelBase:
    """A ksuit model around a plain module (or a dict of them), ready for `CheckpointWriter.save`.

    Args:
        module: an `nn.Module`, or a dict `{key: module}` (values may be dicts again) for a
            composite with one file per part (`<name>.<key>_cp=<tag>_model.th`).
        name: the model name in file names (`<name>_cp=<tag>_model.th`).
        optimizer: the torch optimizer you built and step yourself; its state is saved as
            `<name>_cp=<tag>_optim.th`. For a dict of modules, a dict with one optimizer per part
            (each over that part's parameters only), as the layout keeps one optimizer file per part.
        config: your settings of the module (JSON values, or a pydantic model), recorded in the
            weights file; for a dict of modules, a dict of them by part.

    The module is shared, not copied: keep training it as before.
    """
    if isinstance(module, Mapping):
        return _wrap_parts(module, name, optimizer, config)
    if not isinstance(module, nn.Module):
        raise TypeError(f"wrap() takes an nn.Module or a dict of them, got {type(module).__name__}")
    _refuse_wrappers(module)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"the optimizer of '{name}' must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    model_config = WrappedModuleConfig(
        name=name, module_kind=import_path(module), module_config=_plain_config(config, name)
    )
    return WrappedModel(model_config, module=module, optimizer=optimizer)


def _wrap_parts(
    parts: Mapping[str, Any],
    name: str,
    optimizer: torch.optim.Optimizer | Mapping[str, Any] | None,
    config: Mapping[str, Any] | BaseModel | None,
) -> WrappedComposite:
    if not parts:
        raise ValueError(f"wrap() got an empty dict of modules for '{name}'; pass at least one module")
    if optimizer is not None and not isinstance(optimizer, Mapping):
        raise TypeError(
            f"'{name}' is a dict of modules and the layout keeps one optimizer file per part: pass "
            f"optimizer={{{', '.join(repr(k) + ': ...' for k in parts)}}} with an optimizer over each "
            "part's parameters (or wrap the whole model as one module)"
        )
    if config is not None and not isinstance(config, Mapping):
        raise TypeError(f"the config of the dict of modules '{name}' must be a dict of configs by part")
    for what, given in (("optimizer", optimizer), ("config", config)):
        unknown = sorted(set(given or {}) - set(parts))
        if unknown:
            raise ValueError(f"{what} names unknown parts {unknown} of '{name}'; parts: {', '.join(parts)}")
    wrapped: dict[str, ModelBase] = {}
    for key, part in parts.items():
        if not isinstance(key, str) or "." in key or not key.isidentifier():
            raise ValueError(
                f"part {key!r} of '{name}': part names are Python identifiers without '.', which "
                "separates a composite and its parts in file names"
            )
        if hasattr(nn.Module, key) or key in ("submodels", "name", "optimizer", "model_config"):
            raise ValueError(f"part {key!r} of '{name}' clashes with a model attribute; rename it")
        wrapped[key] = wrap(part, key, (optimizer or {}).get(key), (config or {}).get(key))
    return WrappedComposite(WrappedCompositeConfig(name=name), parts=wrapped)


def _refuse_wrappers(module: nn.Module) -> None:
    if isinstance(module, ModelBase):
        raise TypeError(f"'{type(module).__name__}' is already a ksuit model: pass it to the writer as it is")
    if isinstance(module, nn.parallel.DistributedDataParallel):
        raise TypeError("got a DistributedDataParallel-wrapped module; wrap the module itself (ddp.module)")
    if type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod"):
        raise TypeError("got a torch.compile-wrapped module; wrap the original module (compiled._orig_mod)")


def _check_optimizer_params(optimizer: torch.optim.Optimizer, module: nn.Module, name: str) -> None:
    own = {id(p) for p in module.parameters()}
    foreign = sum(1 for g in optimizer.param_groups for p in g["params"] if id(p) not in own)
    if foreign:
        raise ValueError(
            f"the optimizer of '{name}' updates {foreign} tensors that are not parameters of its module; "
            "its state file would not belong to that module. Build the optimizer over module.parameters() "
            "(for a dict of modules: one optimizer per part)"
        )


def _plain_config(config: Mapping[str, Any] | BaseModel | None, name: str) -> dict[str, Any] | None:
    if config is None:
        return None
    if isinstance(config, BaseModel):
        plain: Any = config.model_dump(mode="json")
    elif isinstance(config, Mapping):
        plain = dict(config)
    else:
        raise TypeError(
            f"the config of '{name}' must be a dict or a pydantic model, got {type(config).__name__}"
        )
    try:
        json.dumps(plain)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"the config of '{name}' must hold JSON values (str, int, float, bool, None, lists, dicts): {e}"
        ) from None
    result: dict[str, Any] = plain
    return result
