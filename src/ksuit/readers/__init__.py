"""What exists and how to load it: listing, checkpoint sets, model loading."""

from ksuit.readers.folders import CheckpointFolder, checkpoint_folders
from ksuit.readers.listing import CheckpointInfo, find_checkpoint_dir, list_checkpoints
from ksuit.readers.model_loading import load_model, load_model_payload
from ksuit.readers.resume_point import ResumePoint
from ksuit.readers.resume_set import LoadedSet, load_resume_set
from ksuit.readers.sets import CheckpointSet, scan_sets, select_resume_set

__all__ = [
    "CheckpointFolder",
    "CheckpointInfo",
    "CheckpointSet",
    "LoadedSet",
    "checkpoint_folders",
    "ResumePoint",
    "find_checkpoint_dir",
    "list_checkpoints",
    "load_model",
    "load_model_payload",
    "load_resume_set",
    "scan_sets",
    "select_resume_set",
]
