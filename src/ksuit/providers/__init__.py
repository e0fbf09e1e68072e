"""Where a run's files go."""

from ksuit.providers.path_provider import PathProvider

__all__ = ["PathProvider"]
