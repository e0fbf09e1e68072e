"""Which leaves of a model tree a list of names selects (the writer's `model_names_to_save`,
the callbacks' and initializers' `model_names`)."""

from __future__ import annotations

from collections.abc import Sequence

from ksuit.models.base import CompositeModel, Model, ModelBase


def select_leaves(model: ModelBase, names: Sequence[str] | None) -> list[tuple[str, Model]]:
    """`(file name, leaf)` of the leaves `names` selects: submodel keys (`encoder`,
    `backbone.encoder`) or full names (`autoencoder.encoder`); a composite's name selects every
    leaf below it; None selects all. Unknown names are a ValueError listing the valid ones."""
    leaves = list(model.iter_leaves())
    if names is None:
        return leaves
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"model names must be a list of str, got {names!r}")
    selectable: dict[str, list[str]] = {model.name: [n for n, _ in leaves]}
    if isinstance(model, CompositeModel):
        for key, full, _sub in model.iter_submodels():
            below = [n for n, _ in leaves if n == full or n.startswith(full + ".")]
            selectable[key] = below
            selectable[full] = below
    unknown = [n for n in names if n not in selectable]
    if unknown:
        known = ", ".join(sorted(selectable))
        raise ValueError(
            f"unknown submodel {', '.join(repr(u) for u in unknown)} of '{model.name}'; known: {known}"
        )
    wanted = {leaf for n in names for leaf in selectable[n]}
    return [(n, leaf) for n, leaf in leaves if n in wanted]
