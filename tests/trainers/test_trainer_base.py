import io
import os
import signal
from pathlib import Path

import pytest
import torch
from tests.conftest import assert_bitwise_equal
from torch.utils.data import DataLoader, TensorDataset

from ksuit.callbacks import Callback, CheckpointCallback, ValidationLossCallback
from ksuit.initializers import ResumeInitializer
from ksuit.providers import PathProvider
from ksuit.schemas.run import load_run_config
from ksuit.storage import load_file
from ksuit.trainers import BaseTrainer, TrainingInterrupted
from ksuit.trainers.reconstruction import ReconstructionTrainer
from ksuit.trainers.runner import prepare_run, run
from ksuit.zoo.autoencoder import Autoencoder, AutoencoderConfig, DecoderConfig, EncoderConfig

TINY = Path(__file__).parents[1] / "e2e" / "tiny_autoencoder.yaml"


def tiny(tmp_path, *overrides, run_id="run", resume=False, resume_from=None):
    return prepare_run(
        load_run_config(TINY, list(overrides)), tmp_path, run_id, resume=resume, resume_from=resume_from
    )


def model(optimizer=True):
    opt = {"kind": "torch.optim.SGD", "lr": 0.1} if optimizer else None
    return Autoencoder(
        AutoencoderConfig(
            encoder=EncoderConfig(input_dim=4, hidden_dim=8, latent_dim=2, optimizer_config=opt),
            decoder=DecoderConfig(latent_dim=2, hidden_dim=8, output_dim=4, optimizer_config=opt),
        )
    )


def data(n=32):
    return TensorDataset(torch.randn(n, 4, generator=torch.Generator().manual_seed(1)))


def weights(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


class SendSignalAt(Callback):
    """Sends a signal to this process after a given update (to test the graceful stop)."""

    def __init__(self, update, signum=signal.SIGTERM):
        super().__init__(name="send_signal")
        self.update, self.signum = update, signum

    def after_update(self, trainer):
        if trainer.update_counter.update == self.update:
            os.kill(os.getpid(), self.signum)


def test_training_lowers_the_loss(tmp_path):
    prepared = tiny(tmp_path, "trainer.max_epochs=6", "callbacks=[]")
    seen = []

    class Record(Callback):
        def after_update(self, trainer):
            if "loss/train" in trainer.metrics and trainer.update_counter.at_epoch_end:
                seen.append(trainer.metrics["loss/train"])

    prepared.trainer.callbacks.append(Record())
    run(prepared)
    assert len(seen) == 6 and seen[-1] < seen[0] * 0.7
    assert str(prepared.trainer.update_counter.cur_iteration) == "E6_U48_S384"


@pytest.mark.parametrize(
    ("override", "end"), [("trainer.max_updates=5", "E0_U5_S40"), ("trainer.max_samples=100", "E1_U13_S104")]
)
def test_any_one_end_condition(tmp_path, override, end):
    prepared = tiny(tmp_path, "trainer.max_epochs=null", override, "callbacks=[]")
    run(prepared)
    assert str(prepared.trainer.update_counter.cur_iteration) == end


def test_end_and_batch_size_checks(tmp_path):
    pp = PathProvider(tmp_path, "r")
    with pytest.raises(ValueError, match="exactly one of max_epochs"):
        BaseTrainer(pp, effective_batch_size=8)
    with pytest.raises(ValueError, match="exactly one of max_epochs"):
        BaseTrainer(pp, effective_batch_size=8, max_epochs=1, max_updates=3)
    with pytest.raises(ValueError, match="precision"):
        BaseTrainer(pp, effective_batch_size=8, max_epochs=1, precision="fp8")
    trainer = ReconstructionTrainer(
        pp, effective_batch_size=6, accumulation_steps=4, max_epochs=1, device="cpu"
    )
    with pytest.raises(ValueError, match="not divisible"):
        trainer.fit(model(), data())
    trainer = ReconstructionTrainer(pp, effective_batch_size=64, max_epochs=1, device="cpu")
    with pytest.raises(ValueError, match="fewer than one update"):
        trainer.fit(model(), data(32))


def test_loss_must_be_overridden_and_well_formed(tmp_path):
    with pytest.raises(NotImplementedError, match="must override loss"):
        BaseTrainer(PathProvider(tmp_path, "r"), effective_batch_size=8, max_updates=1, device="cpu").fit(
            model(), data()
        )

    class DictLoss(BaseTrainer):
        def loss(self, m, batch):
            x = batch[0]
            err = (m(x) - x) ** 2
            return {"total": err.mean(), "max": err.max()}

    trainer = DictLoss(PathProvider(tmp_path, "r"), effective_batch_size=8, max_epochs=1, device="cpu")
    trainer.fit(model(), data())
    assert {"loss/train", "loss/train/max"} <= set(trainer.metrics)

    class NoTotal(BaseTrainer):
        def loss(self, m, batch):
            return {"mse": m(batch[0]).pow(2).mean()}

    with pytest.raises(KeyError, match="without 'total'"):
        NoTotal(PathProvider(tmp_path, "r2"), effective_batch_size=8, max_epochs=1, device="cpu").fit(
            model(), data()
        )


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    results = []
    for accumulation in (1, 4):
        torch.manual_seed(0)
        m = model()
        trainer = ReconstructionTrainer(
            PathProvider(tmp_path, f"a{accumulation}"),
            effective_batch_size=8,
            accumulation_steps=accumulation,
            max_epochs=2,
            device="cpu",
        )
        assert trainer.fit(m, data()) is m
        assert trainer.batch_size == 8 // accumulation
        results.append(weights(m))
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=1e-5, atol=1e-6)


def test_accepts_a_dataloader_and_keeps_its_collate_fn(tmp_path):
    calls = []

    def collate(items):
        calls.append(len(items))
        return torch.stack([i[0] for i in items])

    trainer = ReconstructionTrainer(
        PathProvider(tmp_path, "r"), effective_batch_size=8, max_epochs=1, device="cpu"
    )
    trainer.fit(model(), DataLoader(data(), batch_size=3, collate_fn=collate))
    assert calls == [8, 8, 8, 8]  # ksuit's sampler decides the batches, the loader's collate_fn builds them


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_mixed_precision(tmp_path, precision):
    trainer = ReconstructionTrainer(
        PathProvider(tmp_path, "r"), effective_batch_size=8, max_epochs=2, device="cpu", precision=precision
    )
    m = trainer.fit(model(), data())
    assert all(torch.isfinite(p).all() for p in m.parameters())
    state = trainer.state_dict()
    assert ("grad_scaler" in state) == (precision == "float16")
    if precision == "float16":
        assert state["grad_scaler"]["scale"] > 0


def test_state_dict_shape_and_weights_only(tmp_path):
    prepared = tiny(tmp_path, "trainer.max_epochs=1")
    run(prepared)
    state = prepared.trainer.state_dict()
    assert {"callback_state_dicts", "training_iteration", "rng"} <= set(state)
    assert "grad_scaler" not in state
    assert set(state["callback_state_dicts"]) == {
        "validation_loss",
        "checkpoint",
        "checkpoint.2",
        "best_checkpoint",
        "ema",
    }
    assert state["training_iteration"] == {"epoch": 1, "update": 8, "sample": 64}
    assert state["rng"]["world_size"] == 1 and len(state["rng"]["ranks"]) == 1
    assert set(state["rng"]["ranks"][0]) >= {"python", "numpy", "torch"}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    assert_bitwise_equal(torch.load(buffer, weights_only=True), state)
    on_disk = load_file(prepared.path_provider.checkpoint_path / "autoencoder_cp=last_trainer.th")
    assert on_disk["training_iteration"] == state["training_iteration"]


def test_load_state_dict_names_mismatched_callbacks_and_resumes_elastically(tmp_path):
    prepared = tiny(tmp_path, "trainer.max_epochs=1")
    run(prepared)
    state = prepared.trainer.state_dict()
    other = tiny(tmp_path, "trainer.max_epochs=1", "callbacks.0.name=val", run_id="other")
    other.trainer.setup(other.model, other.datasets["train"])
    with pytest.raises(
        ValueError,
        match=r"without saved state: val; saved state of unknown callbacks: "
        r"validation_loss",
    ):
        other.trainer.load_state_dict(state)
    two_ranks = dict(
        state,
        rng={"world_size": 2, "ranks": state["rng"]["ranks"] * 2},
        data=dict(state["data"], world_size=2),
    )
    # another world size is an elastic resume: the RNG is re-derived, and the change recorded
    prepared.trainer.load_state_dict(two_ranks)
    event = prepared.trainer.elastic_events[-1]
    assert (event["from_world_size"], event["world_size"]) == (2, 1)
    assert prepared.trainer.state_dict()["elastic"][-1] == event
    with pytest.raises(ValueError, match="effective_batch_size=16"):
        prepared.trainer.load_state_dict(dict(state, data=dict(state["data"], effective_batch_size=16)))


def test_sigterm_saves_latest_and_resume_is_bitwise_exact(tmp_path):
    reference = tiny(tmp_path / "reference")
    run(reference)

    interrupted = tiny(tmp_path / "interrupted")
    interrupted.trainer.callbacks.append(SendSignalAt(update=11))  # mid-epoch 2, not on a save boundary
    with pytest.raises(TrainingInterrupted) as info:
        run(interrupted)
    assert info.value.signal_name == "SIGTERM" and info.value.exit_code == 143
    assert str(info.value.training_iteration) == "E1_U11_S88"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored

    resumed = tiny(tmp_path / "interrupted", resume=True)
    resumed.trainer.callbacks.append(SendSignalAt(update=-1))  # same callback names as the stopped run
    run(resumed)
    assert resumed.trainer.resumed_from.tag == "latest"
    assert str(resumed.trainer.resumed_from.training_iteration) == "E1_U11_S88"

    ref_dir = reference.path_provider.checkpoint_path
    res_dir = resumed.path_provider.checkpoint_path
    finals = sorted(p.name for p in ref_dir.glob("*_cp=last_*.th"))
    assert len(finals) == 7  # weights and optim of both, trainer, EMA of both
    for name in finals + ["autoencoder.encoder_cp=best_model.loss.val_model.th"]:
        a, b = load_file(ref_dir / name), load_file(res_dir / name)
        if name.endswith("_trainer.th"):
            a["callback_state_dicts"].pop("send_signal", None)
            b["callback_state_dicts"].pop("send_signal", None)
        assert_bitwise_equal(a, b, name)


def test_sigint_stops_too_and_resume_refuses_other_callbacks(tmp_path):
    prepared = tiny(tmp_path)
    prepared.trainer.callbacks.append(SendSignalAt(update=3, signum=signal.SIGINT))
    with pytest.raises(TrainingInterrupted) as info:
        run(prepared)
    assert info.value.exit_code == 130
    assert (prepared.path_provider.checkpoint_path / "autoencoder_cp=latest_trainer.th").exists()
    resumed = tiny(tmp_path, resume=True)  # without the send_signal callback
    with pytest.raises(ValueError, match="saved state of unknown callbacks: send_signal"):
        run(resumed)


def test_resuming_a_finished_run_trains_nothing(tmp_path, caplog):
    run(tiny(tmp_path, "trainer.max_epochs=1"))
    resumed = tiny(tmp_path, "trainer.max_epochs=1", resume=True, resume_from="last")
    with caplog.at_level("INFO", logger="ksuit"):
        run(resumed)
    assert "nothing to train" in caplog.text


def test_resume_initializer_directly(tmp_path):
    def latest_every_2_updates():
        return CheckpointCallback(
            save_weights=False,
            save_optim=False,
            save_latest_weights=True,
            save_latest_optim=True,
            every_n_updates=2,
        )

    m = model()
    callbacks = [latest_every_2_updates()]
    ReconstructionTrainer(
        PathProvider(tmp_path, "r"), effective_batch_size=8, max_updates=6, device="cpu", callbacks=callbacks
    ).fit(m, data())
    fresh = model()
    trainer = ReconstructionTrainer(
        PathProvider(tmp_path, "r"),
        effective_batch_size=8,
        max_updates=6,
        device="cpu",
        callbacks=[latest_every_2_updates()],
    )
    trainer.fit(fresh, data(), initializer=ResumeInitializer(tmp_path / "r"))
    assert_bitwise_equal(weights(fresh), weights(m))


def test_setup_prepares_a_run_without_training(tmp_path):
    m, val = model(), data(8)
    trainer = ReconstructionTrainer(
        PathProvider(tmp_path, "r"), effective_batch_size=8, accumulation_steps=2, max_epochs=2, device="cpu"
    )
    trainer.setup(m, data(32), {"val": val})
    assert trainer.model is m and m.is_initialized and trainer.device == torch.device("cpu")
    assert (trainer.batch_size, trainer.updates_per_epoch) == (4, 4)
    assert trainer.update_counter.update == 0 and str(trainer.update_counter.end_iteration) == "E2_U8_S64"
    assert trainer.datasets["val"] is val and set(trainer.datasets) == {"train", "val"}
    before = weights(m)
    state = trainer.state_dict()  # a set-up trainer has a state, and loads one
    trainer.load_state_dict(state)
    assert_bitwise_equal(weights(m), before)  # nothing trained
    assert not [p for p in (tmp_path / "r").rglob("*") if p.is_file()]  # nothing written
    with pytest.raises(ValueError, match="not divisible by world size 1 x accumulation_steps 3"):
        ReconstructionTrainer(
            PathProvider(tmp_path, "r"), effective_batch_size=8, accumulation_steps=3, max_epochs=1
        ).setup(model(), data())


def test_what_setup_builds_is_refused_before_setup(tmp_path):
    trainer = ReconstructionTrainer(PathProvider(tmp_path, "r"), effective_batch_size=8, max_epochs=1)
    assert not trainer.is_set_up
    for attribute in ("model", "update_counter", "checkpoint_writer"):
        with pytest.raises(
            RuntimeError, match=rf"ReconstructionTrainer\.{attribute} exists once the trainer is set up"
        ):
            getattr(trainer, attribute)
    with pytest.raises(RuntimeError, match="needs a set-up trainer"):
        trainer.load_state_dict({})
    m = model()
    trainer.setup(m, data())
    assert trainer.is_set_up and trainer.model is m
    assert trainer.checkpoint_writer.update_counter is trainer.update_counter


def test_validation_of_the_training_data_given_as_a_dataloader(tmp_path):
    train = data()
    trainer = ReconstructionTrainer(
        PathProvider(tmp_path, "r"),
        effective_batch_size=8,
        max_epochs=1,
        device="cpu",
        callbacks=[ValidationLossCallback(dataset="train")],
    )
    trainer.fit(model(), DataLoader(train, batch_size=3))
    assert trainer.datasets["train"] is train  # the loader's dataset: callbacks evaluate datasets
    assert trainer.metric_updates["loss/val"] == 4


def test_setup_prepares_the_snapshot_memory_of_async_saving(tmp_path):
    trainer = ReconstructionTrainer(
        PathProvider(tmp_path, "r"), effective_batch_size=8, max_epochs=1, device="cpu", async_save=True
    )
    m = model()
    trainer.setup(m, data(32))
    pool = trainer.checkpoint_writer.snapshot_pool
    weights_bytes = sum(t.numel() * t.element_size() for t in m.state_dict().values())
    assert pool is not None and all(b.nbytes > weights_bytes for b in pool.buffers)
    assert not [p for p in (tmp_path / "r").rglob("*") if p.is_file()]  # nothing written
    trainer.checkpoint_writer.close()
