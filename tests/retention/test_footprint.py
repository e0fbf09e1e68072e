"""The seed's autoencoder scenario for 100 epochs with `keep_last: 2` and `keep_every_epochs: 10`
(`examples/autoencoder_retention.yaml`, via `benchmarks/retention_footprint.py`, which prints the
README's numbers): the folder holds exactly the expected sets, and less than keeping everything
or a Lightning-style default would."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "retention_footprint.py"


def load_footprint():
    spec = importlib.util.spec_from_file_location("retention_footprint", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.footprint


def scratch(tmp_path: Path) -> Path:
    """tmpfs when there is one: 200 saves with fsync are slow on a shared disk."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="ksuit-footprint-", dir=shm))
    return tmp_path


def test_the_autoencoder_for_100_epochs_keeps_the_milestones_and_the_last_two(tmp_path):
    root = scratch(tmp_path)
    try:
        result = load_footprint()(root)
    finally:
        if root != tmp_path:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
    milestones = [f"E{e}_U{2 * e}_S{128 * e}" for e in range(10, 101, 10)]
    assert result["progress_kept"] == milestones[:-1] + ["E99_U198_S12672", "E100_U200_S12800"]
    assert result["sets"] == result["progress_kept"] + ["last", "latest"]
    assert result["progress_written"] == 100
    assert result["retention"] < result["lightning"] < result["everything"]
    print(
        f"\nbytes on disk: retention {result['retention']}, keep everything {result['everything']}, "
        f"Lightning-style {result['lightning']}"
    )
