"""What to save: payloads and file sets for models, optimizers and trainers."""

from ksuit.writers.checkpoint_writer import CheckpointKeys, CheckpointWriter

__all__ = ["CheckpointKeys", "CheckpointWriter"]
