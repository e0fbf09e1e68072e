"""The progress bar is a presentation callback: it draws on rank 0 in a terminal, stops whatever
way `fit` ends, and takes no part in the trainer file, so a run resumes exactly with or without it."""

import io
import logging

import pytest
import torch
from rich.console import Console
from rich.logging import RichHandler
from tests.conftest import assert_bitwise_equal
from torch.utils.data import TensorDataset

from ksuit.callbacks import Callback, CheckpointCallback, ProgressBarCallback
from ksuit.initializers import ResumeInitializer
from ksuit.providers import PathProvider
from ksuit.trainers.reconstruction import ReconstructionTrainer
from ksuit.zoo.autoencoder import Autoencoder, AutoencoderConfig, DecoderConfig, EncoderConfig


def model():
    opt = {"kind": "torch.optim.SGD", "lr": 0.1}
    return Autoencoder(
        AutoencoderConfig(
            encoder=EncoderConfig(input_dim=4, hidden_dim=8, latent_dim=2, optimizer_config=opt),
            decoder=DecoderConfig(latent_dim=2, hidden_dim=8, output_dim=4, optimizer_config=opt),
        )
    )


def data():
    return TensorDataset(torch.randn(48, 4, generator=torch.Generator().manual_seed(1)))


def trainer(tmp_path, run_id="r", max_updates=4, progress=True, callbacks=()):
    return ReconstructionTrainer(
        PathProvider(tmp_path, run_id),
        effective_batch_size=8,
        max_updates=max_updates,
        device="cpu",
        progress=progress,
        callbacks=list(callbacks),
    )


@pytest.fixture
def terminal():
    """A rich log handler on 'ksuit' whose console is a terminal writing into a buffer: the bar
    shares that console (as under `ksuit train`), so it draws."""
    buffer = io.StringIO()
    handler = RichHandler(console=Console(file=buffer, force_terminal=True, width=100))
    logging.getLogger("ksuit").addHandler(handler)
    yield buffer
    logging.getLogger("ksuit").removeHandler(handler)


class Peek(Callback):
    """Runs after the bar within each update and records whether the bar is drawing."""

    order = 200

    def __init__(self, bar, fail_at=None):
        super().__init__(name="peek")
        self.bar, self.fail_at, self.seen, self.live = bar, fail_at, [], None

    def after_update(self, trainer):
        self.seen.append(self.bar.progress is not None)
        self.live = self.bar.progress
        if trainer.update_counter.update == self.fail_at:
            raise RuntimeError("boom")


def test_draws_in_a_terminal_and_is_not_in_the_trainer_file(tmp_path, terminal):
    t = trainer(tmp_path)
    bar = t.callbacks[-1]
    assert isinstance(bar, ProgressBarCallback) and bar.name == "progress_bar"
    peek = Peek(bar)
    t.callbacks.append(peek)
    t.fit(model(), data())
    assert peek.seen == [True] * 4
    assert bar.progress is None and not peek.live.live.is_started  # stopped at the end
    assert "4/4" in terminal.getvalue()
    assert set(t.state_dict()["callback_state_dicts"]) == {"peek"}


def test_nothing_drawn_without_a_terminal_or_without_progress(tmp_path):
    for progress in (True, False):
        t = trainer(tmp_path, run_id=f"p{progress}", progress=progress)
        assert any(isinstance(cb, ProgressBarCallback) for cb in t.callbacks) == progress
        t.fit(model(), data())  # pytest captures stderr: not a terminal
        assert all(cb.progress is None for cb in t.callbacks if isinstance(cb, ProgressBarCallback))


def test_an_error_stops_the_bar(tmp_path, terminal):
    t = trainer(tmp_path)
    bar = t.callbacks[-1]
    peek = Peek(bar, fail_at=2)
    t.callbacks.append(peek)
    with pytest.raises(RuntimeError, match="boom"):
        t.fit(model(), data())
    assert peek.seen == [True, True]
    assert bar.progress is None and not peek.live.live.is_started


@pytest.mark.parametrize(("saved_with", "resumed_with"), [(False, True), (True, False)])
def test_a_run_resumes_exactly_with_or_without_the_bar(tmp_path, terminal, saved_with, resumed_with):
    def latest_every_2_updates():
        return CheckpointCallback(
            save_weights=False,
            save_optim=False,
            save_latest_weights=True,
            save_latest_optim=True,
            every_n_updates=2,
        )

    torch.manual_seed(0)
    reference = model()
    trainer(tmp_path, "ref", 6, progress=False, callbacks=[latest_every_2_updates()]).fit(reference, data())
    torch.manual_seed(0)
    trainer(tmp_path, "r", 4, progress=saved_with, callbacks=[latest_every_2_updates()]).fit(model(), data())
    resumed = model()
    t = trainer(tmp_path, "r", 6, progress=resumed_with, callbacks=[latest_every_2_updates()])
    t.fit(resumed, data(), initializer=ResumeInitializer(tmp_path / "r"))  # strict callback matching
    assert str(t.resumed_from.training_iteration) == "E0_U4_S32"  # mid-epoch (6 updates per epoch)
    assert_bitwise_equal(resumed.state_dict(), reference.state_dict())
