"""ksuit: structured, crash-safe, fast checkpoints for PyTorch training."""

from ksuit.callbacks import (
    BestCheckpointCallback,
    Callback,
    CheckpointCallback,
    EmaCallback,
    PeriodicCallback,
)
from ksuit.initializers import PreviousRunInitializer, ResumeInitializer
from ksuit.integrations.loop import LoopState, resume
from ksuit.layout import checkpoint_filename, parse_checkpoint_filename
from ksuit.models import CompositeModel, Model, ModelBase
from ksuit.providers import PathProvider
from ksuit.readers import CheckpointInfo, list_checkpoints, load_model
from ksuit.retention import RetentionPolicy
from ksuit.schemas.models import ModelBaseConfig, OptimizerConfig
from ksuit.storage import CorruptCheckpointError, UnsafeCheckpointError, load_file
from ksuit.trainers import BaseTrainer
from ksuit.utils.training import TrainingIteration, UpdateCounter
from ksuit.writers import CheckpointKeys, CheckpointWriter

__version__ = "0.1.0"

__all__ = [
    "BaseTrainer",
    "BestCheckpointCallback",
    "Callback",
    "CheckpointCallback",
    "EmaCallback",
    "LoopState",
    "PeriodicCallback",
    "PreviousRunInitializer",
    "ResumeInitializer",
    "CheckpointInfo",
    "CheckpointKeys",
    "CheckpointWriter",
    "CompositeModel",
    "CorruptCheckpointError",
    "Model",
    "ModelBase",
    "ModelBaseConfig",
    "OptimizerConfig",
    "PathProvider",
    "RetentionPolicy",
    "TrainingIteration",
    "UnsafeCheckpointError",
    "UpdateCounter",
    "__version__",
    "checkpoint_filename",
    "list_checkpoints",
    "load_file",
    "load_model",
    "parse_checkpoint_filename",
    "resume",
]
