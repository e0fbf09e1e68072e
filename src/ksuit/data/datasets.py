"""Small datasets a run config can name: scikit-learn's digits (shipped inside scikit-learn, no
download) and generated data. Each builder returns named datasets (`train`, `val`)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset


def split(data: torch.Tensor, val_fraction: float, seed: int) -> dict[str, Dataset[Any]]:
    """`{"train": ..., "val": ...}` from a seeded permutation (no `val` when the fraction is 0)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(len(data) * val_fraction))
    result: dict[str, Dataset[Any]] = {"train": TensorDataset(data[order[n_val:]])}
    if n_val:
        result["val"] = TensorDataset(data[order[:n_val]])
    return result


def digits(val_fraction: float = 0.2, seed: int = 0) -> dict[str, Dataset[Any]]:
    """scikit-learn's 1797 handwritten digits, 8x8 = 64 features scaled to [0, 1]; batches are `(x,)`."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(
            "the 'digits' dataset needs scikit-learn, which ksuit installs only with its demo extra: "
            "pip install 'ksuit[demo]' (or pip install scikit-learn); or use data kind 'synthetic'"
        ) from e
    x = torch.from_numpy(load_digits().data).float() / 16.0
    return split(x, val_fraction, seed)


def synthetic(
    num_samples: int = 2048,
    dim: int = 64,
    latent_dim: int = 8,
    noise: float = 0.05,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, Dataset[Any]]:
    """Generated data near a `latent_dim`-dimensional subspace of `dim` dimensions (something an
    autoencoder can learn); batches are `(x,)`. The same seed gives the same data."""
    for what, value in (("num_samples", num_samples), ("dim", dim), ("latent_dim", latent_dim)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{what} must be a positive int, got {value!r}")
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(latent_dim, dim, generator=g) / latent_dim**0.5
    z = torch.randn(num_samples, latent_dim, generator=g)
    x = torch.tanh(z @ basis) + noise * torch.randn(num_samples, dim, generator=g)
    return split(x, val_fraction, seed)


DATASET_KINDS = {"digits": digits, "synthetic": synthetic}
