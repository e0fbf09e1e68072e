"""`ksuit verify`, `ls` and `inspect` over one run folder full of hostile files: each file is
reported as a problem of its own set, exit codes are 1 (2 for a path that is no file), and no
command crashes, hangs, prints a traceback or lets a file name drive the terminal."""

from __future__ import annotations

import json
import os

import pytest
from tests import hostile as h
from tests.test_hostile_files import SAFETENSORS_CASES, TORCH_CASES
from typer.testing import CliRunner

from ksuit.cli import app
from ksuit.storage.local.safe_files import hash_regular_file as hash_file

runner = CliRunner()


def manifest_for(folder, group: str, tag: str, filename: str, update: int) -> None:
    size, checksum = hash_file(folder / filename)
    iteration = {"epoch": 0, "update": update, "sample": 0}
    entry = {"size": size, "checksum": checksum, "kind": "model", "training_iteration": iteration}
    manifest = {
        "group": group,
        "tag": tag,
        "files": {filename: entry},
        "training_iteration": iteration,
        "version": 1,
    }
    (folder / f"{group}_cp={tag}.manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def hostile_run(tmp_path):
    """A run whose every set holds one hostile file (listed with its true size and checksum, so
    verify gets as far as loading it), plus damaged manifests, special files and odd names."""
    run_dir = tmp_path / "run"
    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True)
    files = []
    for i, (_, data, *_) in enumerate(TORCH_CASES):
        files.append(f"t_cp=E0_U{i}_S0_model.th")
        (folder / files[-1]).write_bytes(data)
        manifest_for(folder, "t", f"E0_U{i}_S0", files[-1], i)
    for i, (_, data, _) in enumerate(SAFETENSORS_CASES):
        files.append(f"s_cp=E0_U{i}_S0_model.safetensors")
        (folder / files[-1]).write_bytes(data)
        manifest_for(folder, "s", f"E0_U{i}_S0", files[-1], i)
    (folder / "d_cp=latest.manifest.json").write_bytes(b'{"group": "d\xff"}')
    (folder / "e_cp=latest.manifest.json").write_bytes(b"[" * 100_000)
    os.mkfifo(folder / "f_cp=latest_model.th")
    os.mkfifo(folder / "g_cp=latest.manifest.json")
    (tmp_path / "outside.th").write_bytes(b"SECRET" * 100)
    (folder / "l_cp=latest_model.th").symlink_to(tmp_path / "outside.th")
    (folder / "n\x1b[2J_cp=latest_model.th").write_bytes(h.random_bytes())
    with open(os.path.join(os.fsencode(folder), b"u\xff_cp=latest_model.th"), "wb") as f:
        f.write(h.random_bytes())
    fifos = (folder / "f_cp=latest_model.th", folder / "g_cp=latest.manifest.json")
    return run_dir, folder, files, fifos


def invoke(args, fifos):
    return h.call_with_deadline(lambda: runner.invoke(app, [str(a) for a in args]), fifos)


def assert_clean(result):
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert "\x1b" not in result.output, "a file name wrote a terminal escape sequence"
    assert "SECRET" not in result.output and "outside" not in result.output


def test_verify_reports_every_hostile_file_and_exits_1(hostile_run):
    run_dir, folder, files, fifos = hostile_run
    result = invoke(["verify", run_dir], fifos)
    assert result.exit_code == 1, result.output
    assert_clean(result)
    problems = [line for line in result.output.splitlines() if "@E0_U" in line or "@latest" in line]
    for name in files:
        assert any(name in line for line in problems), f"{name} not reported:\n{result.output}"
    for name in ("d_cp=latest.manifest.json", "e_cp=latest.manifest.json", "g_cp=latest.manifest.json"):
        assert f"(manifest): {name}" in result.output or name in result.output
    assert "f_cp=latest_model.th: is a FIFO" in result.output
    assert "l_cp=latest_model.th: is a symbolic link" in result.output
    assert "0 with problems" not in result.output


def test_ls_lists_what_is_regular_and_reports_the_rest(hostile_run):
    run_dir, folder, files, fifos = hostile_run
    result = invoke(["ls", run_dir], fifos)
    assert result.exit_code == 1, result.output
    assert_clean(result)
    assert "problem: f_cp=latest_model.th: is a FIFO" in result.output
    assert "problem: l_cp=latest_model.th: is a symbolic link" in result.output
    assert "problem: d_cp=latest.manifest.json" in result.output
    assert "\\x1b" in result.output and "\\xff" in result.output  # odd names: escaped, still shown


def test_inspect_refuses_each_hostile_file_with_exit_1(hostile_run):
    run_dir, folder, files, fifos = hostile_run
    for name in files:
        result = invoke(["inspect", folder / name], fifos)
        assert result.exit_code == 1, f"{name}: {result.output}"
        assert_clean(result)
        assert name in result.output
    result = invoke(["inspect", folder / "f_cp=latest_model.th"], fifos)
    assert result.exit_code == 2 and "is not a file" in result.output
