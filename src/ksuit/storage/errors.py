"""Errors raised when a checkpoint file cannot be trusted."""


class CorruptCheckpointError(RuntimeError):
    """A file is not a readable checkpoint: empty, truncated, torn, damaged (wrongly typed or
    inconsistent headers and manifests), or it does not match its manifest."""


class UnsafeCheckpointError(RuntimeError):
    """A file ksuit refuses to read because trusting it could run code or exhaust resources:
    pickled objects other than tensors and plain Python values, compressed records, sizes beyond
    sane bounds, or a special file (FIFO, device, symbolic link) where a regular file belongs."""
