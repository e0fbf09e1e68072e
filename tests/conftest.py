"""Fixtures shared by the whole suite."""

from __future__ import annotations

import pytest
import torch

from ksuit.providers import PathProvider
from ksuit.utils.training import TrainingIteration, UpdateCounter
from ksuit.zoo.autoencoder import AutoencoderConfig, DecoderConfig, EncoderConfig
from tests.s3_server import s3, s3_endpoint  # noqa: F401  (fixtures: a moto S3 endpoint, a bucket)

ADAMW = {"kind": "torch.optim.AdamW", "lr": 1e-3, "weight_decay": 0.05}


def autoencoder_config(freeze_encoder: bool = False, optim: bool = True) -> AutoencoderConfig:
    opt = ADAMW if optim else None
    return AutoencoderConfig(
        encoder=EncoderConfig(input_dim=16, hidden_dim=32, latent_dim=4, optimizer_config=opt),
        decoder=DecoderConfig(latent_dim=4, hidden_dim=32, output_dim=16, optimizer_config=opt),
        freeze_encoder=freeze_encoder,
    )


def train_one_step(model) -> None:
    """One AdamW step on every submodel, so optimizer state is non-empty."""
    x = torch.randn(4, 16)
    loss = ((model(x) - x) ** 2).mean()
    loss.backward()
    for _, leaf in model.iter_leaves():
        if leaf.optimizer is not None:
            leaf.optimizer.step()
            leaf.optimizer.zero_grad()


class FakeTrainer:
    """Anything with state_dict() is accepted as trainer by CheckpointWriter.save."""

    def __init__(self, update_counter: UpdateCounter):
        self.update_counter = update_counter
        self.calls = 0

    def state_dict(self) -> dict:
        self.calls += 1
        return {
            "callback_state_dicts": {"cb": {"best": 0.5}},
            "training_iteration": dict(self.update_counter.cur_iteration),
            "rng": {"torch": torch.get_rng_state()},
        }


@pytest.fixture
def path_provider(tmp_path) -> PathProvider:
    return PathProvider(tmp_path / "out", "run1")


@pytest.fixture
def update_counter() -> UpdateCounter:
    return UpdateCounter(None, TrainingIteration(epoch=30), updates_per_epoch=20, effective_batch_size=4)


def assert_bitwise_equal(a, b, where: str = "") -> None:
    """Nested dicts/lists of tensors and plain values are equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def save_resumable_set(path_provider: PathProvider, update_counter: UpdateCounter) -> None:
    """One save of the small autoencoder at update 1: progress tag and latest, with trainer."""
    from ksuit.writers import CheckpointWriter
    from ksuit.zoo.autoencoder import Autoencoder

    model = Autoencoder(autoencoder_config()).initialize()
    train_one_step(model)
    update_counter.next_update()
    CheckpointWriter(path_provider, update_counter).save(
        model,
        "E0_U1_S0",
        trainer=FakeTrainer(update_counter),
        save_latest_weights=True,
        save_latest_optim=True,
    )


def written_files(path_provider: PathProvider) -> list[str]:
    """Names in the run's checkpoint folder ([] when nothing created it: PathProvider does no I/O)."""
    folder = path_provider.checkpoint_path
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []
