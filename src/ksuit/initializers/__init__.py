"""Initializers: what a run loads before its first update (resume, or weights of another run)."""

from ksuit.initializers.base import Initializer, parse_checkpoint_spec
from ksuit.initializers.previous_run import PreviousRunInitializer, transform_state_dict
from ksuit.initializers.resume import ResumeInitializer

INITIALIZER_KINDS = {"previous_run": PreviousRunInitializer, "resume": ResumeInitializer}

__all__ = [
    "INITIALIZER_KINDS",
    "Initializer",
    "PreviousRunInitializer",
    "ResumeInitializer",
    "parse_checkpoint_spec",
    "transform_state_dict",
]
