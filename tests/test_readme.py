"""The README's code is what users copy: its Python blocks must run (offline: nothing in them
may need the network)."""

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_python_blocks_run(tmp_path):
    blocks = python_blocks()
    assert len(blocks) >= 5
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    outputs = []
    for i, block in enumerate(blocks):
        script = tmp_path / f"block{i}.py"
        script.write_text(block)
        result = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env
        )
        assert result.returncode == 0, f"README block {i} failed:\n{result.stderr}"
        outputs.append(result.stdout)
    assert "autoencoder.encoder E10_U200_S6400 model" in outputs[0]
    expected = "Encoder {'epoch': 30, 'update': 600, 'sample': 19200} ksuit.zoo.autoencoder.EncoderConfig"
    assert expected in outputs[0]
    everything = "".join(outputs)
    # the integrations: a plain loop resumed, Lightning's files listed, the newest complete HF checkpoint
    assert "resumed from latest at E0_U60_S0" in everything
    assert "lightning last.ckpt E2_U6" in everything
    assert "transformers checkpoint-6" in everything
    remote = [out for block, out in zip(blocks, outputs, strict=True) if "memory://" in block]
    assert remote and "autoencoder.encoder_cp=latest_model.th" in remote[0]
