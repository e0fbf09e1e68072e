import os
import signal

import pytest

from ksuit.trainers.signals import StopRequest, TrainingInterrupted
from ksuit.utils.training import TrainingIteration


def test_first_signal_is_recorded_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGINT)  # a later signal does not replace the first
        assert stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_second_ctrl_c_aborts_at_once():
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_interrupted_message_and_exit_code():
    e = TrainingInterrupted(signal.SIGTERM, TrainingIteration(1, 5, 40), "latest", "runs/x")
    assert e.exit_code == 143
    assert "SIGTERM at E1_U5_S40" in str(e) and "'latest' in runs/x" in str(e)
