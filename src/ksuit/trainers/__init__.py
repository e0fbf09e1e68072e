"""The training loop: `BaseTrainer` (override `loss`), exact resume, signals, torchrun."""

from ksuit.trainers.base import BaseTrainer, ResumePoint, seed_everything
from ksuit.trainers.signals import TrainingInterrupted

__all__ = ["BaseTrainer", "ResumePoint", "TrainingInterrupted", "seed_everything"]
