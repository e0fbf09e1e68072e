"""Every file ksuit writes loads with plain torch.load(weights_only=True) where ksuit cannot be imported."""

import subprocess
import sys
import textwrap

from ksuit.writers import CheckpointWriter
from ksuit.zoo.autoencoder import Autoencoder
from tests.conftest import FakeTrainer, autoencoder_config, train_one_step

LOADER = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoKsuit(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "ksuit" or name.startswith("ksuit."):
                raise ImportError("ksuit is blocked in this process")
            return None

    sys.meta_path.insert(0, NoKsuit())
    import torch
    loaded = 0
    for path in sys.argv[1:]:
        obj = torch.load(path, weights_only=True)
        assert isinstance(obj, dict), path
        assert all(isinstance(k, str) for k in obj), path
        loaded += 1
    assert not any(m == "ksuit" or m.startswith("ksuit.") for m in sys.modules)
    print("loaded", loaded)
    """
)


def test_every_file_loads_without_ksuit(path_provider, update_counter):
    model = Autoencoder(autoencoder_config()).initialize()
    train_one_step(model)
    w = CheckpointWriter(path_provider, update_counter)
    w.save(
        model,
        "E0_U0_S0",
        trainer=FakeTrainer(update_counter),
        save_latest_weights=True,
        save_latest_optim=True,
    )
    w.save_model_checkpoint(
        "ae_ema=0.9_cp=latest_model.th", model.encoder.state_dict(), "latest", model.encoder.model_config
    )
    files = sorted(str(p) for p in path_provider.checkpoint_path.iterdir() if p.name.endswith(".th"))
    assert len(files) == 11
    # the progress tag's and latest's optimizer and trainer files are hard links: 3 pairs
    assert len({(p.stat().st_ino) for p in map(__import__("pathlib").Path, files)}) == 8
    result = subprocess.run(
        [sys.executable, "-I", "-c", LOADER, *files], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"loaded {len(files)}"
