"""`ksuit export` of a sharded checkpoint folder: one `.th` or `.safetensors` file, bitwise equal
to the consolidated payload, loadable without ksuit, written streaming tensor by tensor (extra
memory at most the largest tensor plus 64 MiB, measured in a fresh process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ksuit.cli import app
from ksuit.storage import PendingFile, SetWriter, load_file, open_backend
from ksuit.storage.sharded.load import load_full
from tests.conftest import assert_bitwise_equal
from tests.storage.sharded_sets import MODEL, OPTIM, write_sharded_set

HERE = Path(__file__).parent
MIB = 1 << 20


def test_export_to_torch_and_safetensors_is_bitwise_equal(tmp_path):
    write_sharded_set(tmp_path)
    folder = open_backend(tmp_path)
    for name, to, ext in (
        (MODEL, "torch", "th"),
        (MODEL, "safetensors", "safetensors"),
        (OPTIM, "torch", "th"),
    ):
        result = CliRunner().invoke(app, ["export", str(tmp_path / name), "--to", to])
        assert result.exit_code == 0, result.output
        exported = tmp_path / name.replace(".dcp", f".{ext}")
        expected = load_full(folder.child(name))
        assert_bitwise_equal(load_file(exported), expected, name)
        if ext == "th":  # plain torch, without ksuit, mapped or not
            assert_bitwise_equal(torch.load(exported, weights_only=True), expected, name)
            assert_bitwise_equal(torch.load(exported, weights_only=True, mmap=True), expected, name)


def test_an_optimizer_folder_is_not_exported_to_safetensors(tmp_path):
    write_sharded_set(tmp_path)
    result = CliRunner().invoke(app, ["export", str(tmp_path / OPTIM), "--to", "safetensors"])
    assert result.exit_code == 2 and "optimizer and trainer files stay in format='torch'" in result.output
    assert not (tmp_path / OPTIM.replace(".dcp", ".safetensors")).exists()


@pytest.mark.parametrize("to", ["torch", "safetensors"])
def test_export_holds_at_most_the_largest_tensor_plus_64_mib(tmp_path, to):
    sizes = {"a": 40 * MIB, "b": 32 * MIB, "c": 24 * MIB}
    state = {k: torch.arange(n // 4, dtype=torch.float32) * (i + 1) for i, (k, n) in enumerate(sizes.items())}
    payload = {"state_dict": state, "run_id": "r"}
    SetWriter(tmp_path).write([PendingFile(MODEL, payload, "dcp", "model", "m", "latest")])
    target = tmp_path / ("export.th" if to == "torch" else "export.safetensors")
    done = subprocess.run(
        [sys.executable, str(HERE / "export_memory.py"), str(tmp_path / MODEL), to, str(target)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    extra = (report["after_kib"] - report["before_kib"]) * 1024
    assert extra <= max(sizes.values()) + 64 * MIB, f"{extra / MIB:.0f} MiB"
    assert_bitwise_equal(load_file(target)["state_dict"], state)
