"""The disk footprint of retention on the seed's autoencoder scenario (README, "Retention").

Runs `examples/autoencoder_retention.yaml` (100 epochs; the encoder's weights every epoch, the
latest weights and optimizer states of both submodels every epoch, `last` at the end) twice, on
small synthetic data (the files do not depend on the data): with its policy (`keep_last: 2`,
`keep_every_epochs: 10`) and without one (keep everything). The third number is what a
Lightning-style default would hold for the same checkpoints: every checkpoint carrying the
weights and optimizer state of the whole model (one resumable set each: 11 progress
checkpoints plus `last.ckpt`).

    python benchmarks/retention_footprint.py [--epochs 100]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

from ksuit.readers import scan_sets
from ksuit.schemas.run import load_run_config
from ksuit.trainers.runner import prepare_run, run

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "autoencoder_retention.yaml"
FAST_DATA = ["data={kind: synthetic, num_samples: 160, dim: 64, latent_dim: 8, val_fraction: 0.2}"]


def bytes_on_disk(folder: Path) -> int:
    """Every file of the folder, each inode once (hard links are one file)."""
    held = {}
    for name in os.listdir(folder):
        st = os.lstat(folder / name)
        held[(st.st_dev, st.st_ino)] = st.st_size
    return sum(held.values())


def train(root: Path, run_id: str, overrides: list[str]) -> Path:
    config = load_run_config(CONFIG, FAST_DATA + overrides)
    prepared = prepare_run(config, root, run_id)
    run(prepared)
    return prepared.run_dir


def footprint(root: Path, epochs: int = 100) -> dict[str, object]:
    """The three numbers and the sets retention kept."""
    overrides = [f"trainer.max_epochs={epochs}"]
    retained = train(root, "retained", overrides)
    everything = train(root, "everything", [*overrides, "retention=null"])
    sets = scan_sets(retained)
    progress = [s.tag for s in sets if s.tag.startswith("E")]
    resumable = next(s for s in sets if s.tag == "latest")  # weights + optimizer states + trainer
    lightning = (len(progress) + 1) * resumable.size_bytes
    return {
        "retention": bytes_on_disk(retained / "checkpoints"),
        "everything": bytes_on_disk(everything / "checkpoints"),
        "lightning": lightning,
        "full_checkpoint": resumable.size_bytes,
        "sets": [s.tag for s in sets],
        "progress_kept": progress,
        "progress_written": len([s for s in scan_sets(everything) if s.tag.startswith("E")]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        result = footprint(Path(tmp), args.epochs)
    kib = 1024
    print(f"sets kept: {', '.join(result['sets'])}")
    print("| policy | bytes on disk |\n| --- | ---: |")
    print(f"| retention (`keep_last: 2`, `keep_every_epochs: 10`) | {result['retention'] / kib:.1f} KiB |")
    print(
        f"| keep everything ({result['progress_written']} progress sets) "
        f"| {result['everything'] / kib:.1f} KiB |"
    )
    print(
        f"| Lightning-style (each of the {len(result['progress_kept']) + 1} checkpoints with weights and "
        f"optimizer state) | {result['lightning'] / kib:.1f} KiB |"
    )


if __name__ == "__main__":
    main()
