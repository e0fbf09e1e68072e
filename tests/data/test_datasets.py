import pytest
import torch

from ksuit.data import digits, split, synthetic


def test_digits_are_64_features_in_unit_range_split_by_seed():
    data = digits(val_fraction=0.2, seed=0)
    assert len(data["train"]) + len(data["val"]) == 1797 and len(data["val"]) == 359
    (x,) = data["train"][0]
    assert x.shape == (64,) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    again = digits(val_fraction=0.2, seed=0)
    assert torch.equal(data["val"].tensors[0], again["val"].tensors[0])


def test_digits_without_scikit_learn_says_how_to_get_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sklearn", None)  # as if scikit-learn were not installed
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'ksuit\[demo\]'"):
        digits()


def test_synthetic_is_deterministic_and_sized():
    a, b = synthetic(num_samples=50, dim=6, seed=3), synthetic(num_samples=50, dim=6, seed=3)
    assert torch.equal(a["train"].tensors[0], b["train"].tensors[0])
    assert a["train"].tensors[0].shape == (40, 6)
    assert not torch.equal(
        synthetic(num_samples=50, dim=6, seed=4)["train"].tensors[0], a["train"].tensors[0]
    )
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        synthetic(num_samples=0)


def test_split_without_validation():
    assert set(split(torch.zeros(10, 2), 0.0, 0)) == {"train"}
    with pytest.raises(ValueError, match="val_fraction"):
        split(torch.zeros(10, 2), 1.0, 0)
