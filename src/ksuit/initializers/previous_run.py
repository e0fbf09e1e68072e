"""`PreviousRunInitializer`: start a new run from the weights of another run."""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ksuit.initializers.base import Initializer, describe_spec, parse_checkpoint_spec
from ksuit.layout import LATEST, format_info
from ksuit.models.selection import select_leaves
from ksuit.models.sharding import is_sharded
from ksuit.readers import CheckpointInfo, list_checkpoints, load_model_payload
from ksuit.readers.leaf_loading import place_like
from ksuit.readers.listing import checkpoint_folder, read_folder
from ksuit.storage.locations import is_url
from ksuit.utils.training import TrainingIteration

if TYPE_CHECKING:
    from ksuit.trainers.base import BaseTrainer

logger = logging.getLogger(__name__)


def _rename_rules(patterns_to_rename: Any) -> list[tuple[re.Pattern[str], str]]:
    if not patterns_to_rename:
        return []
    if isinstance(patterns_to_rename, dict):
        items = list(patterns_to_rename.items())
    else:
        items = []
        for rule in patterns_to_rename:
            if isinstance(rule, dict):
                unknown = set(rule) - {"pattern", "replacement"}
                if unknown or "pattern" not in rule:
                    raise ValueError(f"a rename rule is {{pattern: REGEX, replacement: TEXT}}, got {rule!r}")
                items.append((rule["pattern"], rule.get("replacement", "")))
            else:
                pattern, replacement = rule
                items.append((pattern, replacement))
    rules = []
    for pattern, replacement in items:
        try:
            rules.append((re.compile(pattern), str(replacement)))
        except re.error as e:
            raise ValueError(f"patterns_to_rename: {pattern!r} is not a regular expression ({e})") from e
    return rules


def transform_state_dict(
    state_dict: dict[str, Any], keys_to_remove: Sequence[str] = (), patterns_to_rename: Any = None
) -> dict[str, Any]:
    """Drops keys matching any of `keys_to_remove` (exact or glob such as `head.*`), then renames
    keys with each regex rule in turn (`re.sub(pattern, replacement, key)`)."""
    rules = _rename_rules(patterns_to_rename)
    result: dict[str, Any] = {}
    for key, value in state_dict.items():
        if any(key == p or fnmatch.fnmatchcase(key, p) for p in keys_to_remove):
            continue
        for pattern, replacement in rules:
            key = pattern.sub(replacement, key)
        if key in result:
            raise ValueError(f"renaming made two keys '{key}'; check patterns_to_rename")
        result[key] = value
    return result


class PreviousRunInitializer(Initializer):
    """Loads weights of another run into the model of a new run (optimizer, counter and RNG
    start fresh).

    Args:
        run_dir: the other run's folder or checkpoint folder.
        checkpoint: tag (`last` by default, `latest`, `best_model.loss.val`, a progress tag) or a
            minimal spec such as `epoch=10`.
        model_names: submodels to initialize (key paths or full names); default every leaf.
        source_model_name: the other run's model name when it differs from this model's.
        ema_factor: load the EMA weights of this factor instead of the weights.
        keys_to_remove: state dict keys (exact or glob) to leave out, e.g. a head to retrain.
        patterns_to_rename: regex rules `{pattern: replacement}` (or a list of
            `{pattern, replacement}`) applied to every key, in order.
        strict: keys missing from, or unexpected in, the transformed state dict are an error.
    """

    def __init__(
        self,
        run_dir: str | Path,
        checkpoint: Any = "last",
        model_names: list[str] | None = None,
        source_model_name: str | None = None,
        ema_factor: float | None = None,
        keys_to_remove: Sequence[str] = (),
        patterns_to_rename: Any = None,
        strict: bool = True,
    ):
        self.run_dir = run_dir if is_url(run_dir) else Path(run_dir)
        spec = parse_checkpoint_spec(checkpoint)
        if spec is None:
            raise ValueError(
                "PreviousRunInitializer needs the checkpoint to start from: a tag such as 'last' (the "
                "default), 'latest' or 'best_model.loss.val', or a spec such as 'epoch=10'"
            )
        self.checkpoint: str | TrainingIteration = spec
        self.model_names = None if model_names is None else list(model_names)
        self.source_model_name = source_model_name
        self.ema_factor = ema_factor
        self.keys_to_remove = list(keys_to_remove)
        self.patterns_to_rename = patterns_to_rename
        _rename_rules(patterns_to_rename)  # fail early on a bad rule
        self.strict = strict
        self.loaded: dict[str, Path | str] = {}

    def _matches(self, info: CheckpointInfo) -> bool:
        spec = self.checkpoint
        if isinstance(spec, str):
            return info.tag == spec
        it = info.training_iteration
        return it is not None and all(getattr(it, k) == v for k, v in spec)

    def find_file(
        self, infos: list[CheckpointInfo], source_name: str, listed: set[str] | frozenset[str] = frozenset()
    ) -> CheckpointInfo:
        """The weights file of `source_name` that the spec selects; among equal candidates a file
        of a checkpoint set (named in `listed`, the files manifests list) wins over a standalone
        copy such as a `ksuit export` of it, which may be older."""
        want_info = "" if self.ema_factor is None else format_info({"ema": float(self.ema_factor)})
        candidates = [
            i for i in infos if i.model_name == source_name and i.role == "model" and i.info == want_info
        ]
        matching = [i for i in candidates if self._matches(i)]
        if not matching:
            tags = ", ".join(sorted({i.tag for i in candidates})) or "none"
            what = f"{source_name}" + (f" (EMA {self.ema_factor})" if self.ema_factor is not None else "")
            raise FileNotFoundError(
                f"no weights of {what} match {describe_spec(self.checkpoint)} in {self.run_dir}; "
                f"its tags: {tags}"
            )
        # a spec may match a progress tag and `latest`/`last` at the same iteration: prefer the progress tag
        matching.sort(
            key=lambda i: (
                not TrainingIteration.is_progress_string(i.tag),
                i.tag == LATEST,
                i.tag,
                i.name not in listed,
                i.name,
            )
        )
        return matching[0]

    def apply(self, trainer: BaseTrainer) -> None:
        model = trainer.model
        infos = list_checkpoints(self.run_dir)
        listed = set(read_folder(checkpoint_folder(self.run_dir)).owner)
        for name, leaf in select_leaves(model, self.model_names):
            source = (
                name if self.source_model_name is None else self.source_model_name + name[len(model.name) :]
            )
            info = self.find_file(infos, source, listed)
            # checked against its manifest (size and checksum) when one lists it
            state = transform_state_dict(
                load_model_payload(info.path)["state_dict"], self.keys_to_remove, self.patterns_to_rename
            )
            if is_sharded(leaf):  # a file or a consolidated sharded folder, into this rank's shards
                state = place_like(state, leaf.state_dict())
            result = leaf.load_state_dict(state, strict=False)
            if self.strict and (result.missing_keys or result.unexpected_keys):
                raise ValueError(
                    f"weights {info.name} do not fit {name}: missing {result.missing_keys}, unexpected "
                    f"{result.unexpected_keys}; use keys_to_remove / patterns_to_rename, or strict: false"
                )
            self.loaded[name] = info.path
            if trainer.rank == 0:
                logger.info("initialized %s from %s", name, info.path)
