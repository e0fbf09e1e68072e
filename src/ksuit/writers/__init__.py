"""What to save: payloads, save plans and file sets for models, optimizers and trainers."""

from ksuit.writers.checkpoint_writer import CheckpointKeys, CheckpointWriter, SupportsStateDict
from ksuit.writers.plan import SaveSpec, TagPlan

__all__ = ["CheckpointKeys", "CheckpointWriter", "SaveSpec", "SupportsStateDict", "TagPlan"]
