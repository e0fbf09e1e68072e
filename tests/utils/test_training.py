import pytest

from ksuit.utils.training import TrainingIteration, UpdateCounter


def test_str_and_parse_roundtrip():
    it = TrainingIteration(epoch=10, update=200, sample=800)
    assert str(it) == "E10_U200_S800"
    assert TrainingIteration.from_string("E10_U200_S800") == it
    assert TrainingIteration.from_string("E3") == TrainingIteration(epoch=3)
    assert TrainingIteration.from_string("U5_S20") == TrainingIteration(update=5, sample=20)


@pytest.mark.parametrize("bad", ["", "latest", "E10U200", "U1_E2", "E1_E2", "E-1", "E1__U2", "e1", "E1_"])
def test_parse_rejects_with_clear_message(bad):
    with pytest.raises(ValueError, match="E10_U200_S800"):
        TrainingIteration.from_string(bad)


def test_dict_yields_only_set_fields():
    assert dict(TrainingIteration(epoch=1, sample=7)) == {"epoch": 1, "sample": 7}
    assert dict(TrainingIteration(1, 2, 3)) == {"epoch": 1, "update": 2, "sample": 3}


def test_arithmetic_and_comparison():
    a = TrainingIteration(1, 10, 40)
    b = TrainingIteration(2, 20, 80)
    assert a + b == TrainingIteration(3, 30, 120)
    assert b - a == a
    assert a < b and b > a and a <= a and b >= a
    with pytest.raises(ValueError, match="different fields"):
        _ = a + TrainingIteration(epoch=1)
    with pytest.raises(ValueError, match="different fields"):
        _ = a < TrainingIteration(epoch=1)


def test_specification_flags():
    assert TrainingIteration(1, 2, 3).is_fully_specified
    assert not TrainingIteration(epoch=1).is_fully_specified
    assert TrainingIteration(epoch=1).is_minimally_specified
    assert not TrainingIteration(epoch=1, update=2).is_minimally_specified


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (TrainingIteration(epoch=3), TrainingIteration(3, 30, 120)),
        (TrainingIteration(update=25), TrainingIteration(2, 25, 100)),
        (TrainingIteration(sample=101), TrainingIteration(2, 26, 101)),
    ],
)
def test_to_fully_specified(given, expected):
    assert given.to_fully_specified(updates_per_epoch=10, effective_batch_size=4) == expected


def test_to_fully_specified_refuses_two_fields():
    with pytest.raises(ValueError, match="exactly one"):
        TrainingIteration(epoch=1, update=3).to_fully_specified(10, 4)


def test_negative_and_wrong_types_rejected():
    with pytest.raises(ValueError):
        TrainingIteration(epoch=-1)
    with pytest.raises(TypeError):
        TrainingIteration(epoch=1.5)


def test_update_counter_counts_to_end_given_in_epochs():
    uc = UpdateCounter(None, TrainingIteration(epoch=2), updates_per_epoch=3, effective_batch_size=8)
    assert uc.end_iteration == TrainingIteration(2, 6, 48)
    assert uc.cur_iteration == TrainingIteration(0, 0, 0)
    epochs = 0
    while not uc.is_finished:
        for _ in range(3):
            uc.next_update()
            uc.add_samples(8)
        assert uc.at_epoch_end
        uc.next_epoch()
        epochs += 1
    assert epochs == 2
    assert str(uc.cur_iteration) == "E2_U6_S48"


def test_update_counter_end_in_samples_and_updates():
    uc = UpdateCounter(None, TrainingIteration(sample=20), updates_per_epoch=10, effective_batch_size=8)
    assert uc.end_iteration.update == 3
    for _ in range(2):
        uc.next_update()
        uc.add_samples(8)
    assert not uc.is_finished
    uc.next_update()
    uc.add_samples(8)
    assert uc.is_finished
    uc = UpdateCounter(TrainingIteration(1, 10, 80), TrainingIteration(update=11), 10, 8)
    assert not uc.is_finished and uc.at_epoch_end
    uc.next_update()
    assert uc.is_finished


def test_update_counter_validates():
    with pytest.raises(ValueError, match="updates_per_epoch"):
        UpdateCounter(None, TrainingIteration(epoch=1), 0, 8)
    with pytest.raises(TypeError, match="end_iteration"):
        UpdateCounter(None, 5, 10, 8)


def test_update_counter_state_roundtrip():
    uc = UpdateCounter(None, TrainingIteration(epoch=5), 10, 8)
    uc.next_update()
    uc.add_samples(8)
    other = UpdateCounter(None, TrainingIteration(epoch=5), 10, 8)
    other.load_state_dict(uc.state_dict())
    assert other.cur_iteration == TrainingIteration(0, 1, 8)


def test_at_epoch_end_and_its_deprecated_name():
    uc = UpdateCounter(None, TrainingIteration(epoch=2), updates_per_epoch=2, effective_batch_size=8)
    ends = []
    for _ in range(4):
        uc.next_update()
        ends.append(uc.at_epoch_end)
    assert ends == [False, True, False, True]
    assert uc.end_update == 4
