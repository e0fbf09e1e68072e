"""Datasets a run config can name (`data.kind`): `digits`, `synthetic`, or an import path to a
function returning `{"train": Dataset, "val": Dataset, ...}`."""

from ksuit.data.datasets import DATASET_KINDS, digits, split, synthetic

__all__ = ["DATASET_KINDS", "digits", "split", "synthetic"]
