"""Errors raised when a checkpoint file cannot be trusted."""


class CorruptCheckpointError(RuntimeError):
    """A file is truncated, torn or does not match its manifest."""


class UnsafeCheckpointError(RuntimeError):
    """A file carries pickled objects other than tensors and plain Python values."""
