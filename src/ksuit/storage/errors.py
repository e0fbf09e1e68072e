"""Errors raised when a checkpoint file cannot be trusted."""


class CorruptCheckpointError(RuntimeError):
    """A file is not a readable checkpoint: empty, truncated, torn, damaged (wrongly typed or
    inconsistent headers and manifests), or it does not match its manifest."""


class UnsafeCheckpointError(RuntimeError):
    """A file ksuit refuses to read because trusting it could run code or exhaust resources:
    pickled objects other than tensors and plain Python values, compressed records, sizes beyond
    sane bounds, or a special file (FIFO, device, symbolic link) where a regular file belongs."""


class StoreAccessError(OSError):
    """A storage location cannot be used at all, and retrying would not help: missing or refused
    credentials, access denied, a bucket that does not exist. Raised before anything is written;
    the message names the location and the cause."""


class StoreUnavailableError(OSError):
    """A storage location kept failing with transient errors (HTTP 500/503, throttling, dropped
    connections) until the retry budget ran out. What was committed before is intact."""


class ConcurrentWriterError(RuntimeError):
    """Another writer changed a checkpoint folder this writer was saving to (a second process on
    the same run, e.g. a job still running after it was preempted and restarted): this save is
    not committed, and the other writer's sets are left as they are."""
