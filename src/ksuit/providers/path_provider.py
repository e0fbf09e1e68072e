"""Paths of a run: `<output_root>/<run_id>[/<stage_name>]/checkpoints`."""

from __future__ import annotations

import secrets
from datetime import datetime
from pathlib import Path

from ksuit.layout import validate_name


class PathProvider:
    """Knows where a run writes, and does no I/O: the storage backend creates the folders
    (durably) when the first checkpoint is written."""

    def __init__(self, output_root_path: str | Path, run_id: str, stage_name: str | None = None):
        if not isinstance(output_root_path, (str, Path)) or str(output_root_path) == "":
            raise TypeError(f"output_root_path must be a non-empty path, got {output_root_path!r}")
        self.output_root_path = Path(output_root_path)
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
    def run_output_path(self) -> Path:
        path = self.output_root_path / self.run_id
        if self.stage_name is not None:
            path = path / self.stage_name
        return path

    @property
    def checkpoint_path(self) -> Path:
        return self.run_output_path / "checkpoints"

    def __repr__(self) -> str:
        return (
            f"PathProvider({str(self.output_root_path)!r}, {self.run_id!r}, stage_name={self.stage_name!r})"
        )
