"""Paths of a run: `<output_root>/<run_id>[/<stage_name>]/checkpoints`.

The output root is a local path or a URL (`s3://bucket/runs`, `memory://runs`, any fsspec
URL): a local root gives `Path`s, a URL root gives URLs (`str`), joined with '/'.
"""

from __future__ import annotations

import secrets
from datetime import datetime
from pathlib import Path
from typing import Any

from ksuit.layout import validate_name


def is_url(location: object) -> bool:
    """A location written as `<scheme>://...` (not a local path)."""
    return isinstance(location, str) and "://" in location


class PathProvider:
    """Knows where a run writes, and does no I/O: the storage backend creates the folders
    (durably) when the first checkpoint is written.

    `storage_options` (for URL roots) go to the file system of the root (s3fs: `key`,
    `secret`, `endpoint_url`, `profile`, ...); the run's checkpoint writer registers them for
    the root, so every reader in the process (resume, EMA, `ksuit.load_model`) uses them too.
    """

    def __init__(
        self,
        output_root_path: str | Path,
        run_id: str,
        stage_name: str | None = None,
        storage_options: dict[str, Any] | None = None,
    ):
        if not isinstance(output_root_path, (str, Path)) or str(output_root_path) == "":
            raise TypeError(f"output_root_path must be a non-empty path or URL, got {output_root_path!r}")
        if storage_options is not None and not isinstance(storage_options, dict):
            raise TypeError(f"storage_options must be a dict, got {type(storage_options).__name__}")
        self.output_root_path: Path | str = (
            output_root_path.rstrip("/")
            if isinstance(output_root_path, str) and is_url(output_root_path)
            else Path(output_root_path)
        )
        self.storage_options = dict(storage_options) if storage_options else None
        # folder names, never parts of checkpoint file names: `sweep_lr=0.1` is a fine run_id
        self.run_id = validate_name(run_id, what="run_id", in_file_names=False)
        self.stage_name = (
            None if stage_name is None else validate_name(stage_name, what="stage_name", in_file_names=False)
        )

    @staticmethod
    def generate_run_id() -> str:
        """A sortable, unique id: `YYYYmmdd_HHMMSS_<6 hex>`."""
        return f"{datetime.now():%Y%m%d_%H%M%S}_{secrets.token_hex(3)}"

    @property
    def is_remote(self) -> bool:
        """Whether the root is a URL."""
        return isinstance(self.output_root_path, str)

    def _join(self, base: Path | str, *names: str) -> Path | str:
        if isinstance(base, str):
            return "/".join([base, *names])
        return base.joinpath(*names)

    @property
    def run_output_path(self) -> Path | str:
        names = [self.run_id] + ([self.stage_name] if self.stage_name is not None else [])
        return self._join(self.output_root_path, *names)

    @property
    def checkpoint_path(self) -> Path | str:
        return self._join(self.run_output_path, "checkpoints")

    def __repr__(self) -> str:
        return (
            f"PathProvider({str(self.output_root_path)!r}, {self.run_id!r}, stage_name={self.stage_name!r})"
        )
