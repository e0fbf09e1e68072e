import pytest

from ksuit.callbacks import Callback, PeriodicCallback
from ksuit.utils.training import TrainingIteration, UpdateCounter


class Trainer:
    def __init__(self, updates_per_epoch=4, batch=8):
        self.update_counter = UpdateCounter(None, TrainingIteration(epoch=10), updates_per_epoch, batch)

    def step(self):
        c = self.update_counter
        c.next_update()
        c.add_samples(c.effective_batch_size)
        if c.at_epoch_end:
            c.next_epoch()


def due_updates(cb, updates=24, **kw):
    trainer, due = Trainer(**kw), []
    for _ in range(updates):
        trainer.step()
        if cb.is_due(trainer):
            due.append(trainer.update_counter.update)
    return due


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"every_n_epochs": 2}, [8, 16, 24]),
        ({"every_n_updates": 5}, [5, 10, 15, 20]),
        ({"every_n_samples": 20}, [3, 5, 8, 10, 13, 15, 18, 20, 23]),
        ({"every_n_epochs": 3, "every_n_updates": 5}, [5, 10, 12, 15, 20, 24]),
        ({}, []),
    ],
)
def test_periods(kwargs, expected):
    cb = PeriodicCallback(**kwargs)
    assert due_updates(cb) == expected
    assert cb.invocations_between(0, 24, 4, 8) == len(expected)
    assert cb.invocations_between(10, 24, 4, 8) == len([u for u in expected if u > 10])


def test_invalid_periods():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="every_n_epochs must be a positive int"):
            PeriodicCallback(every_n_epochs=bad)


def test_names_and_default_state():
    cb = Callback()
    assert cb.name == "callback" and cb.name_is_default and cb.state_dict() == {}
    cb.load_state_dict({})
    with pytest.raises(ValueError, match="keeps no state"):
        cb.load_state_dict({"x": 1})
    assert "every_n_epochs=2" in repr(PeriodicCallback(every_n_epochs=2, name="p"))


def test_trainer_makes_default_names_unique_and_refuses_repeated_explicit_ones(tmp_path):
    from ksuit.providers import PathProvider
    from ksuit.trainers import BaseTrainer

    pp = PathProvider(tmp_path, "r")
    trainer = BaseTrainer(
        pp, effective_batch_size=8, max_epochs=1, callbacks=[Callback(), Callback(), Callback("x")]
    )
    assert [cb.name for cb in trainer.callbacks] == ["callback", "callback.2", "x"]
    with pytest.raises(ValueError, match="repeated: x"):
        BaseTrainer(pp, effective_batch_size=8, max_epochs=1, callbacks=[Callback("x"), Callback("x")])
    with pytest.raises(TypeError, match="Callback instances"):
        BaseTrainer(pp, effective_batch_size=8, max_epochs=1, callbacks=[object()])
