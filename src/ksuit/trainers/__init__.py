"""The training loop: `BaseTrainer` (override `loss`), exact resume, signals, torchrun."""

from ksuit.readers.resume_point import ResumePoint
from ksuit.schemas.trainer import TrainerSettings
from ksuit.trainers.base import BaseTrainer
from ksuit.trainers.rng import seed_everything
from ksuit.trainers.signals import TrainingInterrupted

__all__ = ["BaseTrainer", "ResumePoint", "TrainerSettings", "TrainingInterrupted", "seed_everything"]
